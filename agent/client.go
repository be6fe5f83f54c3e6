package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Client talks to a local shuntd over its unix socket.
type Client struct {
	Socket string
	hc     *http.Client
}

// NewClient returns a client for the API socket at path.
func NewClient(path string) *Client {
	return &Client{Socket: path, hc: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}}
}

func (c *Client) do(method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://shuntd"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("talk to shuntd at %s: %w", c.Socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var ae apiError
		if json.Unmarshal(data, &ae) == nil && ae.Error != "" {
			return fmt.Errorf("%s", ae.Error)
		}
		return fmt.Errorf("shuntd: %s: %s", resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// Status fetches the agent status as raw JSON-decoded value v.
func (c *Client) Status(v any) error { return c.do("GET", "/v1/status", nil, v) }

// Services lists services into v.
func (c *Client) Services(v any) error { return c.do("GET", "/v1/services", nil, v) }

// UpdateService creates or replaces a service.
func (c *Client) UpdateService(sc ServiceConfig) error { return c.do("POST", "/v1/services", sc, nil) }

// DeleteService removes a service.
func (c *Client) DeleteService(name string) error {
	return c.do("DELETE", "/v1/services?name="+url.QueryEscape(name), nil, nil)
}

// Pods lists pods into v.
func (c *Client) Pods(v any) error { return c.do("GET", "/v1/pods", nil, v) }

// UpdatePod enrolls a pod; p is a mesh.Pod.
func (c *Client) UpdatePod(p any) error { return c.do("POST", "/v1/pods", p, nil) }

// DeletePod removes a pod.
func (c *Client) DeletePod(name string) error {
	return c.do("DELETE", "/v1/pods?name="+url.QueryEscape(name), nil, nil)
}

package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

// Client is a minimal REST client for the objects tests create: namespaces,
// service accounts, services, endpoint slices, pods, nodes and RBAC.
type Client struct {
	base string
	http *http.Client
}

// APIError is a non-2xx answer.
type APIError struct {
	Code int
	Body string
}

func (e *APIError) Error() string { return fmt.Sprintf("API server answered %d: %s", e.Code, e.Body) }

// NotFound tells whether err is a 404.
func NotFound(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == http.StatusNotFound
}

func (c *Client) raw(ctx context.Context, method, path string, body []byte, contentType string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	if contentType == "" {
		contentType = "application/json"
	}
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return resp.StatusCode, data, err
}

// Do sends in (JSON, nil for none) and decodes the answer into out (nil to
// discard it).
func (c *Client) Do(ctx context.Context, method, path string, in, out any, contentType string) error {
	var body []byte
	if in != nil {
		var err error
		if b, ok := in.([]byte); ok {
			body = b
		} else if body, err = json.Marshal(in); err != nil {
			return err
		}
	}
	code, data, err := c.raw(ctx, method, path, body, contentType)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if code < 200 || code > 299 {
		return fmt.Errorf("%s %s: %w", method, path, &APIError{Code: code, Body: strings.TrimSpace(string(data))})
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// Path returns the collection path of obj (namespaced ones in their namespace).
func Path(obj any) (string, error) {
	ns := func(n string) string {
		if n == "" {
			n = "default"
		}
		return "/namespaces/" + n
	}
	switch o := obj.(type) {
	case *corev1.Namespace:
		return "/api/v1/namespaces", nil
	case *corev1.Node:
		return "/api/v1/nodes", nil
	case *corev1.Pod:
		return "/api/v1" + ns(o.Namespace) + "/pods", nil
	case *corev1.Service:
		return "/api/v1" + ns(o.Namespace) + "/services", nil
	case *corev1.ServiceAccount:
		return "/api/v1" + ns(o.Namespace) + "/serviceaccounts", nil
	case *appsv1.DaemonSet:
		return "/apis/apps/v1" + ns(o.Namespace) + "/daemonsets", nil
	case *discoveryv1.EndpointSlice:
		return "/apis/discovery.k8s.io/v1" + ns(o.Namespace) + "/endpointslices", nil
	case *rbacv1.ClusterRole:
		return "/apis/rbac.authorization.k8s.io/v1/clusterroles", nil
	case *rbacv1.ClusterRoleBinding:
		return "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", nil
	}
	return "", fmt.Errorf("kube client: unsupported type %T", obj)
}

func name(obj any) string {
	if o, ok := obj.(interface{ GetName() string }); ok {
		return o.GetName()
	}
	return ""
}

// Create creates obj and updates it in place with the server's answer.
func (c *Client) Create(ctx context.Context, obj any) error {
	p, err := Path(obj)
	if err != nil {
		return err
	}
	return c.Do(ctx, "POST", p, obj, obj, "")
}

// Update replaces obj (its resourceVersion must be current) and updates it
// in place.
func (c *Client) Update(ctx context.Context, obj any) error {
	p, err := Path(obj)
	if err != nil {
		return err
	}
	return c.Do(ctx, "PUT", p+"/"+name(obj), obj, obj, "")
}

// UpdateStatus replaces obj's status subresource.
func (c *Client) UpdateStatus(ctx context.Context, obj any) error {
	p, err := Path(obj)
	if err != nil {
		return err
	}
	return c.Do(ctx, "PUT", p+"/"+name(obj)+"/status", obj, obj, "")
}

// Get reads obj by its name (and namespace).
func (c *Client) Get(ctx context.Context, obj any) error {
	p, err := Path(obj)
	if err != nil {
		return err
	}
	return c.Do(ctx, "GET", p+"/"+name(obj), nil, obj, "")
}

// MergePatch applies a JSON merge patch to obj and updates it in place.
func (c *Client) MergePatch(ctx context.Context, obj any, patch string) error {
	p, err := Path(obj)
	if err != nil {
		return err
	}
	return c.Do(ctx, "PATCH", p+"/"+name(obj), []byte(patch), obj, "application/merge-patch+json")
}

// Delete deletes obj at once (gracePeriodSeconds=0: pods are force-deleted,
// as there is no kubelet to confirm).
func (c *Client) Delete(ctx context.Context, obj any) error {
	p, err := Path(obj)
	if err != nil {
		return err
	}
	return c.Do(ctx, "DELETE", p+"/"+name(obj), []byte(`{"gracePeriodSeconds":0}`), nil, "")
}

// ApplyYAML creates every document of a multi-document YAML manifest (the
// kinds Path knows).
func (c *Client) ApplyYAML(ctx context.Context, manifest []byte) error {
	for _, doc := range strings.Split(string(manifest), "\n---") {
		var meta struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			return err
		}
		var obj any
		switch meta.Kind {
		case "":
			continue
		case "Namespace":
			obj = &corev1.Namespace{}
		case "ServiceAccount":
			obj = &corev1.ServiceAccount{}
		case "ClusterRole":
			obj = &rbacv1.ClusterRole{}
		case "ClusterRoleBinding":
			obj = &rbacv1.ClusterRoleBinding{}
		default:
			return fmt.Errorf("kube client: ApplyYAML: unsupported kind %q", meta.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			return fmt.Errorf("kube client: %s: %w", meta.Kind, err)
		}
		if err := c.Create(ctx, obj); err != nil {
			return err
		}
	}
	return nil
}

// Namespace creates a namespace with labels and its default ServiceAccount
// (Pods need it; there is no controller manager to make it).
func (c *Client) Namespace(ctx context.Context, ns string, labels map[string]string) error {
	n := &corev1.Namespace{}
	n.Name, n.Labels = ns, labels
	if err := c.Create(ctx, n); err != nil {
		return err
	}
	sa := &corev1.ServiceAccount{}
	sa.Name, sa.Namespace = "default", ns
	return c.Create(ctx, sa)
}

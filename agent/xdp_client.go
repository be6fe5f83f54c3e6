package agent

// XDPStatus fetches the north-south load balancer's status into v.
func (c *Client) XDPStatus(v any) error { return c.do("GET", "/v1/xdp", nil, v) }

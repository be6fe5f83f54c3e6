package agent

// XDS fetches the xDS server's status (an xds.Status) into v.
func (c *Client) XDS(v any) error { return c.do("GET", "/v1/xds", nil, v) }

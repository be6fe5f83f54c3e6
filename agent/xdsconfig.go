package agent

import "github.com/shuntmesh/shunt/xds"

// DefaultXDSSocket is where the xDS server listens for the node's sidecars.
const DefaultXDSSocket = "/run/shunt/xds.sock"

// XDSConfig is the `xds:` section: the agent's xDS server, fed from the
// desired state (see xds.Config for every field and its default):
//
//	xds:
//	  enabled: true
//	  unixSocket: /run/shunt/xds.sock   # default; group 1337, mode 0660
//	  tcpAddr: ":15010"                 # optional, TLS only
//	  tlsCertFile: /etc/shunt/xds.crt
//	  tlsKeyFile: /etc/shunt/xds.key
//	  keepaliveTime: 30s
//	  maxStreams: 4096
//	  maxResourceNames: 65536
type XDSConfig struct {
	// Enabled starts the server (default off).
	Enabled bool `json:"enabled"`
	xds.Config
}

// WithDefaults fills empty fields; the unix socket defaults to
// DefaultXDSSocket.
func (c XDSConfig) WithDefaults() XDSConfig {
	if c.UnixSocket == "" {
		c.UnixSocket = DefaultXDSSocket
	}
	c.Config = c.Config.WithDefaults()
	return c
}

// Validate checks the section (after WithDefaults), enabled or not.
func (c XDSConfig) Validate() error { return c.Config.Validate() }

package xds

import (
	"errors"
	"fmt"
	"time"
)

// Config configures the xDS server. The zero value plus a listener passed
// to Serve is a working server; Validate reports what is inconsistent.
type Config struct {
	// UnixSocket is where ListenAndServe listens for the sidecars of this
	// node (plaintext; the socket file's mode, 0660, guards it). A stale
	// socket file is replaced.
	UnixSocket string `json:"unixSocket,omitempty"`
	// TCPAddr is where ListenAndServe listens on TCP, e.g. ":15010".
	TCPAddr string `json:"tcpAddr,omitempty"`

	// TLSCertFile and TLSKeyFile enable TLS on TCP listeners (both or
	// neither). Unix-socket listeners stay plaintext.
	TLSCertFile string `json:"tlsCertFile,omitempty"`
	TLSKeyFile  string `json:"tlsKeyFile,omitempty"`
	// TLSClientCAFile, with TLS, requires client certificates signed by it.
	TLSClientCAFile string `json:"tlsClientCAFile,omitempty"`

	// ClusterDomain builds service host names (default "cluster.local").
	ClusterDomain string `json:"clusterDomain,omitempty"`
	// ConnectTimeout of the generated clusters (default 5s).
	ConnectTimeout time.Duration `json:"connectTimeout,omitempty"`

	// KeepaliveTime is how long a connection may be idle before the server
	// pings the client (default 30s); KeepaliveTimeout how long it waits for
	// the answer before closing (default 10s).
	KeepaliveTime    time.Duration `json:"keepaliveTime,omitempty"`
	KeepaliveTimeout time.Duration `json:"keepaliveTimeout,omitempty"`
	// KeepaliveMinTime is the shortest client ping interval tolerated
	// (default 10s); pings without an open stream are allowed.
	KeepaliveMinTime time.Duration `json:"keepaliveMinTime,omitempty"`

	// Memory bounds. MaxStreams caps the xDS streams open at once
	// (default 4096); further streams fail with RESOURCE_EXHAUSTED.
	// MaxStreamsPerConn is HTTP/2's concurrent-stream limit per client
	// connection (default 8; ADS needs 1). MaxRecvMsgSize caps one request
	// (default 4 MiB). Each stream holds, besides gRPC's fixed 64 KiB flow
	// control windows, at most one pending response per resource type.
	MaxStreams        int    `json:"maxStreams,omitempty"`
	MaxStreamsPerConn uint32 `json:"maxStreamsPerConn,omitempty"`
	MaxRecvMsgSize    int    `json:"maxRecvMsgSize,omitempty"`
}

// Defaults.
const (
	DefaultKeepaliveTime     = 30 * time.Second
	DefaultKeepaliveTimeout  = 10 * time.Second
	DefaultKeepaliveMinTime  = 10 * time.Second
	DefaultMaxStreams        = 4096
	DefaultMaxStreamsPerConn = 8
	DefaultMaxRecvMsgSize    = 4 << 20
)

// WithDefaults returns c with every unset field at its default.
func (c Config) WithDefaults() Config {
	if c.ClusterDomain == "" {
		c.ClusterDomain = DefaultClusterDomain
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.KeepaliveTime == 0 {
		c.KeepaliveTime = DefaultKeepaliveTime
	}
	if c.KeepaliveTimeout == 0 {
		c.KeepaliveTimeout = DefaultKeepaliveTimeout
	}
	if c.KeepaliveMinTime == 0 {
		c.KeepaliveMinTime = DefaultKeepaliveMinTime
	}
	if c.MaxStreams == 0 {
		c.MaxStreams = DefaultMaxStreams
	}
	if c.MaxStreamsPerConn == 0 {
		c.MaxStreamsPerConn = DefaultMaxStreamsPerConn
	}
	if c.MaxRecvMsgSize == 0 {
		c.MaxRecvMsgSize = DefaultMaxRecvMsgSize
	}
	return c
}

// Validate checks c (after WithDefaults).
func (c Config) Validate() error {
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return errors.New("xds: tlsCertFile and tlsKeyFile must be set together")
	}
	if c.TLSClientCAFile != "" && c.TLSCertFile == "" {
		return errors.New("xds: tlsClientCAFile needs tlsCertFile and tlsKeyFile")
	}
	for name, d := range map[string]time.Duration{
		"connectTimeout": c.ConnectTimeout, "keepaliveTime": c.KeepaliveTime,
		"keepaliveTimeout": c.KeepaliveTimeout, "keepaliveMinTime": c.KeepaliveMinTime,
	} {
		if d < 0 {
			return fmt.Errorf("xds: %s must not be negative", name)
		}
	}
	if c.MaxStreams < 0 || c.MaxRecvMsgSize < 0 {
		return errors.New("xds: maxStreams and maxRecvMsgSize must not be negative")
	}
	return nil
}

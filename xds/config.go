package xds

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// Config configures the xDS server. The zero value plus a listener passed
// to Serve is a working server; Validate reports what is inconsistent. The
// JSON/YAML form is the agent's `xds:` section.
type Config struct {
	// UnixSocket is where ListenAndServe listens for the sidecars of this
	// node (plaintext; the socket file's owner group and mode guard it). A
	// stale socket file is replaced; the folder is created.
	UnixSocket string `json:"unixSocket,omitempty"`
	// UnixSocketGID owns the socket file (default 1337, the sidecar
	// proxies' group; with mode 0660 only root and that group connect).
	UnixSocketGID *int `json:"unixSocketGID,omitempty"`
	// UnixSocketMode is the socket file's mode (default 0660).
	UnixSocketMode uint32 `json:"unixSocketMode,omitempty"`
	// TCPAddr is where ListenAndServe listens on TCP, e.g. ":15010"; it
	// needs TLSCertFile and TLSKeyFile (xDS over TCP is never plaintext).
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
	ConnectTimeout Duration `json:"connectTimeout,omitempty"`

	// KeepaliveTime is how long a connection may be idle before the server
	// pings the client (default 30s); KeepaliveTimeout how long it waits for
	// the answer before closing (default 10s).
	KeepaliveTime    Duration `json:"keepaliveTime,omitempty"`
	KeepaliveTimeout Duration `json:"keepaliveTimeout,omitempty"`
	// KeepaliveMinTime is the shortest client ping interval tolerated
	// (default 10s); pings without an open stream are allowed.
	KeepaliveMinTime Duration `json:"keepaliveMinTime,omitempty"`

	// Limits that bound the memory one client can make the server hold.
	//
	// MaxStreams caps the xDS streams open at once (default 4096); further
	// streams fail with RESOURCE_EXHAUSTED. MaxStreamsPerConn is HTTP/2's
	// concurrent-stream limit per client connection (default 8; ADS needs
	// 1). MaxRecvMsgSize caps one request (default 4 MiB).
	// MaxResourceNames caps the resource names one stream may watch per
	// type (default 65536): a stream asking for more is closed with
	// RESOURCE_EXHAUSTED. Besides, each stream holds at most one pending
	// response per resource type, and gRPC's receive windows are fixed at
	// 64 KiB per stream and per connection.
	MaxStreams        int    `json:"maxStreams,omitempty"`
	MaxStreamsPerConn uint32 `json:"maxStreamsPerConn,omitempty"`
	MaxRecvMsgSize    int    `json:"maxRecvMsgSize,omitempty"`
	MaxResourceNames  int    `json:"maxResourceNames,omitempty"`
}

// Defaults.
const (
	DefaultUnixSocketGID     = 1337
	DefaultUnixSocketMode    = 0o660
	DefaultKeepaliveTime     = 30 * time.Second
	DefaultKeepaliveTimeout  = 10 * time.Second
	DefaultKeepaliveMinTime  = 10 * time.Second
	DefaultMaxStreams        = 4096
	DefaultMaxStreamsPerConn = 8
	DefaultMaxRecvMsgSize    = 4 << 20
	DefaultMaxResourceNames  = 65536
)

// WithDefaults returns c with every unset field at its default.
func (c Config) WithDefaults() Config {
	if c.UnixSocketGID == nil {
		gid := DefaultUnixSocketGID
		c.UnixSocketGID = &gid
	}
	if c.UnixSocketMode == 0 {
		c.UnixSocketMode = DefaultUnixSocketMode
	}
	if c.ClusterDomain == "" {
		c.ClusterDomain = DefaultClusterDomain
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = Duration(DefaultConnectTimeout)
	}
	if c.KeepaliveTime == 0 {
		c.KeepaliveTime = Duration(DefaultKeepaliveTime)
	}
	if c.KeepaliveTimeout == 0 {
		c.KeepaliveTimeout = Duration(DefaultKeepaliveTimeout)
	}
	if c.KeepaliveMinTime == 0 {
		c.KeepaliveMinTime = Duration(DefaultKeepaliveMinTime)
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
	if c.MaxResourceNames == 0 {
		c.MaxResourceNames = DefaultMaxResourceNames
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
	if c.TCPAddr != "" {
		if c.TLSCertFile == "" {
			return errors.New("xds: tcpAddr needs tlsCertFile and tlsKeyFile (xDS over TCP is served with TLS only; sidecars on the node use unixSocket)")
		}
		if _, _, err := net.SplitHostPort(c.TCPAddr); err != nil {
			return fmt.Errorf("xds: tcpAddr %q: %w", c.TCPAddr, err)
		}
	}
	if c.UnixSocketGID != nil && *c.UnixSocketGID < 0 {
		return errors.New("xds: unixSocketGID must not be negative")
	}
	if c.UnixSocketMode > 0o777 {
		return fmt.Errorf("xds: unixSocketMode %#o is not a permission mode (0..0777)", c.UnixSocketMode)
	}
	for name, d := range map[string]Duration{
		"connectTimeout": c.ConnectTimeout, "keepaliveTime": c.KeepaliveTime,
		"keepaliveTimeout": c.KeepaliveTimeout, "keepaliveMinTime": c.KeepaliveMinTime,
	} {
		if d < 0 {
			return fmt.Errorf("xds: %s must not be negative", name)
		}
	}
	if c.MaxStreams < 0 || c.MaxRecvMsgSize < 0 || c.MaxResourceNames < 0 {
		return errors.New("xds: maxStreams, maxRecvMsgSize and maxResourceNames must not be negative")
	}
	return nil
}

// Duration is a time.Duration written as a Go duration string ("30s",
// "1m30s") in JSON and YAML; a bare number is taken as nanoseconds.
type Duration time.Duration

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads a duration string or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err := json.Unmarshal(b, &n); err != nil {
			return fmt.Errorf("duration: want a string such as \"30s\", got %s", b)
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration: %w", err)
	}
	*d = Duration(v)
	return nil
}

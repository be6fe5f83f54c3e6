package xdp

import (
	"errors"
	"strings"
	"testing"

	"github.com/shuntmesh/shunt/mesh"
)

func TestConfigValidate(t *testing.T) {
	const seed = "c2h1bnQteGRwLWxi"
	for _, c := range []struct {
		cfg   Config
		field string // "" = valid
		msg   string
	}{
		{Config{}, "", ""},
		{Config{DSRDevices: []string{"eth0"}}, "", ""}, // backend side needs no seed
		{Config{Devices: []string{"eth0"}, Seed: seed, TableSize: 65521, NodeAddr: "10.0.0.1", NodeAddr6: "fd00::1", SNATPorts: "20000-30000", Conntrack: "shared"}, "", ""},
		{Config{Devices: []string{"eth0"}}, "xdp.seed", "required with devices"},
		{Config{Devices: []string{"eth0"}, Seed: "c2h1bnQ="}, "xdp.seed", "decodes to 5 bytes, want 12"},
		{Config{Devices: []string{"eth0"}, Seed: "c2h1bnQteGRwLWxi-"}, "xdp.seed", "not standard base64"},
		{Config{Devices: []string{"eth0", "eth0"}, Seed: seed}, "xdp.devices[1]", "duplicate device"},
		{Config{Devices: []string{"a/b"}, Seed: seed}, "xdp.devices[0]", "not an interface name"},
		{Config{DSRDevices: []string{""}}, "xdp.dsrDevices[0]", "not an interface name"},
		{Config{Seed: seed, TableSize: 1000}, "xdp.tableSize", "not prime"},
		{Config{Seed: seed, TableSize: 65537}, "xdp.tableSize", "prime but not a supported preset"},
		{Config{NodeAddr: "fd00::1"}, "xdp.nodeAddr", "not an IPv4 address"},
		{Config{NodeAddr6: "10.0.0.1"}, "xdp.nodeAddr6", "not an IPv6 address"},
		{Config{SNATPorts: "3000-2000"}, "xdp.snatPorts", "port range"},
		{Config{SNATPorts: "0-10"}, "xdp.snatPorts", "port range"},
		{Config{Mode: "offload"}, "xdp.mode", "unknown XDP mode"},
		{Config{Conntrack: "global"}, "xdp.conntrack", "unknown LRU kind"},
		{Config{MaxFlows: 10}, "xdp.maxFlows", "out of range"},
	} {
		err := c.cfg.Validate()
		if c.field == "" {
			if err != nil {
				t.Errorf("%+v: %v", c.cfg, err)
			}
			continue
		}
		var fe *mesh.FieldError
		if !errors.As(err, &fe) || fe.Field != c.field || !strings.Contains(fe.Msg, c.msg) {
			t.Errorf("%+v: error %v, want field %s with %q", c.cfg, err, c.field, c.msg)
		}
	}
}

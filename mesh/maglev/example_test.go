package maglev_test

import (
	"fmt"
	"net/netip"

	"github.com/shuntmesh/shunt/mesh/maglev"
)

func Example() {
	seed, err := maglev.ParseSeed("c2h1bnQtbWFnbGV2") // head -c12 /dev/urandom | base64 -w0
	if err != nil {
		panic(err)
	}
	backends := []maglev.Backend{
		{Key: "10.0.0.2:80", Weight: 1},
		{Key: "10.0.0.1:80", Weight: 1},
		{Key: "10.0.0.3:80", Weight: 0}, // draining
	}
	m, _ := maglev.RecommendSize(len(backends))
	table, err := maglev.Build(backends, m, seed)
	if err != nil {
		panic(err)
	}
	fmt.Println("M:", table.Size(), "slots per backend:", table.Counts())

	flow := maglev.NewTuple(netip.MustParseAddrPort("192.0.2.7:40000"), netip.MustParseAddrPort("10.96.0.10:80"), 6)
	b, _ := table.LookupBackend(maglev.FlowHash(flow, seed.DatapathSeed()))
	fmt.Println("flow goes to a live backend:", b.Weight > 0)
	// Output:
	// M: 509 slots per backend: [255 254 0]
	// flow goes to a live backend: true
}

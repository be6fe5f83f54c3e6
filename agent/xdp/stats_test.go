package xdp

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/shuntmesh/shunt/bpf"
)

// enumNames returns the enumerators of a C enum from the object's BTF, in
// value order, without the sentinel.
func enumNames(t *testing.T, spec *ebpf.CollectionSpec, enum, sentinel string) []string {
	t.Helper()
	var e *btf.Enum
	if err := spec.Types.TypeByName(enum, &e); err != nil {
		t.Fatalf("enum %s: %v", enum, err)
	}
	var max uint64
	names := map[uint64]string{}
	for _, v := range e.Values {
		if v.Name == sentinel {
			max = v.Value
			continue
		}
		names[v.Value] = v.Name
	}
	out := make([]string, max)
	for i := range out {
		n, ok := names[uint64(i)]
		if !ok {
			t.Fatalf("enum %s has no value %d below %s", enum, i, sentinel)
		}
		out[i] = n
	}
	return out
}

// TestStatNamesMatchC checks the Go label tables against the C enums and
// their sentinels (bpf/lib/xdplb.h): same length, same order, same names.
func TestStatNamesMatchC(t *testing.T) {
	lb, err := bpf.LoadXdplb()
	if err != nil {
		t.Fatal(err)
	}
	dsr, err := bpf.LoadDsr()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		spec     *ebpf.CollectionSpec
		enum     string
		sentinel string
		prefixes []string
		labels   []string
	}{
		{lb, "xlb_stat", "XLB_STAT_MAX", []string{"XLB_EV_", "XLB_"}, StatNames},
		{dsr, "dsr_stat", "DSR_STAT_MAX", []string{"DSR_"}, DSRStatNames},
	} {
		names := enumNames(t, c.spec, c.enum, c.sentinel)
		if len(names) != len(c.labels) {
			t.Fatalf("%s: %d enumerators before %s, %d Go labels", c.enum, len(names), c.sentinel, len(c.labels))
		}
		for i, n := range names {
			want := n
			for _, p := range c.prefixes {
				if strings.HasPrefix(want, p) {
					want = strings.TrimPrefix(want, p)
					break
				}
			}
			if want = strings.ToLower(want); c.labels[i] != want {
				t.Errorf("%s[%d] = %s: Go label %q, want %q", c.enum, i, n, c.labels[i], want)
			}
		}
	}
}

package xds

import (
	"os"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3" // the bootstrap's typed options
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"
)

// TestEnvoyBootstrap: the sidecar bootstrap the README shows parses as an
// Envoy v3 Bootstrap (no unknown field) and passes Envoy's proto rules,
// including its typed options.
func TestEnvoyBootstrap(t *testing.T) {
	y, err := os.ReadFile("testdata/envoy-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSON(y)
	if err != nil {
		t.Fatal(err)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(j, &b); err != nil {
		t.Fatal(err)
	}
	if err := validateDeep(&b); err != nil {
		t.Fatal(err)
	}
	if b.GetNode().GetId() == "" || b.GetDynamicResources().GetAdsConfig().GetGrpcServices()[0].GetEnvoyGrpc().GetClusterName() != "shunt-xds" ||
		b.GetStaticResources().GetClusters()[0].GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetPipe().GetPath() != "/run/shunt/xds.sock" {
		t.Fatalf("bootstrap: %v", &b)
	}
}

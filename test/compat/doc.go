// Package compat is Shunt's application-compatibility suite: it checks that
// what applications see of their TCP connections is unchanged by whatever
// sits in their path — a sidecar proxy steered by iptables or by Shunt, with
// or without sockmap acceleration.
//
// A scenario is a (client behaviour, server behaviour) pair run over real
// connections between two harness pods: blocking readers with and without
// signals (SA_RESTART and not), Go netpoller readers, MSG_PEEK, MSG_WAITALL,
// FIONREAD, SO_RCVLOWAT, splice, sendfile, zero-length writes, half-close,
// resets in mid-stream, back-pressure against a slow reader, random message
// sizes from 1 B to 8 MiB, full duplex, 1000 connections at once; the
// application under test is the client in one scenario and the server in
// its mirror. Every byte is checked: both ends know the exchange (sizes and
// bytes derive from a seed) and compare each byte read with the stream, and
// both report SHA-256 of what they sent and received, which Run compares. A
// liveness bound (no progress for 10 s) turns a stall into a failure with
// the phase it stalled in; nothing is timed otherwise.
//
// Use (privileged, from a test whose TestMain calls harness.Main):
//
//	env := harness.New(t)
//	topo := compat.NewTopology(t, env, compat.Setup{Name: "go+iptables",
//		ClientProxy: compat.GoProxy, ServerProxy: compat.GoProxy, IPTables: true})
//	res := compat.Run(t, env, topo, compat.All())
//	var m compat.Matrix
//	m.Add(res)
//	t.Log("\n" + m.String())
//	for _, r := range res.Failed() { t.Error(r) }
//
// A topology built without IPTables leaves the steering to the caller
// (Shunt: enroll topo.Client and topo.Server with a sidecar and a sockmap
// mode, then Run). Run adds a row PathRow that fails unless the sidecars
// accepted every connection.
package compat

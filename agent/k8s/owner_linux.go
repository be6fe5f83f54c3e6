package k8s

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// OwnerWatch follows the DaemonSet that runs this agent, to tell an
// uninstall from a restart when the agent is stopped: both end with
// SIGTERM, but only after an uninstall is the DaemonSet deleted (or being
// deleted). The watch is opened while the agent runs, so it still learns
// of the deletion when the uninstall removes the agent's RBAC and
// ServiceAccount right after the DaemonSet: an open watch keeps delivering.
type OwnerWatch struct {
	namespace, name string

	mu       sync.Mutex
	seen     bool // the DaemonSet was observed (so its absence means something)
	deleting bool // deleted, or being deleted
}

// WatchOwner starts watching DaemonSet namespace/name (get, list and watch
// of that one object are needed) with the client configuration of
// kubeconfig (see RESTConfig) until ctx ends.
func WatchOwner(ctx context.Context, kubeconfig, namespace, name string, log *slog.Logger) (*OwnerWatch, error) {
	if namespace == "" || name == "" {
		return nil, fmt.Errorf("owner DaemonSet %q/%q: namespace and name are needed", namespace, name)
	}
	rc, err := RESTConfig(kubeconfig)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	w := &OwnerWatch{namespace: namespace, name: name}
	f := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	inf := f.Apps().V1().DaemonSets().Informer()
	_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		log.Debug("owner DaemonSet watch failed, retrying", "daemonset", namespace+"/"+name, "err", err)
	})
	mark := func(seen, deleting bool) {
		w.mu.Lock()
		was := w.seen && w.deleting
		w.seen = w.seen || seen
		w.deleting = deleting
		now := w.seen && w.deleting
		w.mu.Unlock()
		if now && !was {
			log.Info("the agent's DaemonSet is being deleted: shuntd removes the datapath when it stops", "daemonset", namespace+"/"+name)
		}
	}
	observe := func(obj any) {
		if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.Name == name {
			mark(true, ds.DeletionTimestamp != nil)
		}
	}
	_, err = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    observe,
		UpdateFunc: func(_, obj any) { observe(obj) },
		DeleteFunc: func(any) { mark(false, true) },
	})
	if err != nil {
		return nil, err
	}
	f.Start(ctx.Done())
	return w, nil
}

// Gone reports whether the DaemonSet was seen and then deleted or marked
// for deletion. Never seen (no permission, API server unreachable) is not
// gone: the caller keeps the datapath, the safe side.
func (w *OwnerWatch) Gone() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.seen && w.deleting
}

// Seen reports whether the DaemonSet was observed at all.
func (w *OwnerWatch) Seen() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.seen
}

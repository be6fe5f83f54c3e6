package xds

import (
	"fmt"
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

type allValidator interface{ ValidateAll() error }

// validateDeep runs the message's generated ValidateAll and does the same
// for every message packed in an Any inside it (typed filter and policy
// configs), which ValidateAll treats as opaque bytes.
func validateDeep(m proto.Message) error {
	if v, ok := m.(allValidator); ok {
		if err := v.ValidateAll(); err != nil {
			return err
		}
	}
	return walkAnys(m.ProtoReflect())
}

// holdsAny memoizes, per message type, whether an Any can occur anywhere
// inside it: walkAnys skips the fields that cannot hold one (endpoint
// lists are the bulk of the resources and hold none).
var holdsAny sync.Map // protoreflect.FullName -> bool

func mayHoldAny(md protoreflect.MessageDescriptor) bool {
	if v, ok := holdsAny.Load(md.FullName()); ok {
		return v.(bool)
	}
	anyName := (&anypb.Any{}).ProtoReflect().Descriptor().FullName()
	seen := map[protoreflect.FullName]bool{md.FullName(): true}
	queue := []protoreflect.MessageDescriptor{md}
	found := false
	for len(queue) > 0 && !found {
		d := queue[0]
		queue = queue[1:]
		if d.FullName() == anyName {
			found = true
			break
		}
		fields := d.Fields()
		for i := range fields.Len() {
			fd := fields.Get(i)
			var sub protoreflect.MessageDescriptor
			switch {
			case fd.IsMap():
				sub = fd.MapValue().Message()
			default:
				sub = fd.Message()
			}
			if sub != nil && !seen[sub.FullName()] {
				seen[sub.FullName()] = true
				queue = append(queue, sub)
			}
		}
	}
	holdsAny.Store(md.FullName(), found)
	return found
}

func walkAnys(m protoreflect.Message) error {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("unpacking %s: %w", a.GetTypeUrl(), err)
		}
		if err := validateDeep(inner); err != nil {
			return fmt.Errorf("%s: %w", a.GetTypeUrl(), err)
		}
		return nil
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			if !mayHoldAny(fd.Message()) {
				return true
			}
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = walkAnys(l.Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			if !mayHoldAny(fd.MapValue().Message()) {
				return true
			}
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				err = walkAnys(mv.Message())
				return err == nil
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			if mayHoldAny(fd.Message()) {
				err = walkAnys(v.Message())
			}
		}
		return err == nil
	})
	return err
}

func typeName(m proto.Message) string {
	return string(m.ProtoReflect().Descriptor().Name())
}

package http

import (
	"bytes"
	"encoding"
	"encoding/json"
	"reflect"
	"strconv"
	"strings"
	"sync"

	"github.com/rebound-dr/rebound"
)

// checkKeys walks a JSON document that encoding/json already accepted for
// v and refuses what encoding/json lets through: a key twice in one object
// (encoding/json keeps the last) and a key that names a field of the target
// in another case (encoding/json matches case-insensitively). Both make
// what the server does differ from what the client meant.
func checkKeys(data []byte, v any) error {
	k := keyChecker{dec: json.NewDecoder(bytes.NewReader(data))}
	k.dec.UseNumber()
	return k.value(reflect.TypeOf(v), "")
}

type keyChecker struct{ dec *json.Decoder }

var (
	jsonUnmarshaler = reflect.TypeFor[json.Unmarshaler]()
	textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()
)

// target drops pointers and reports nil for a type that decodes itself,
// whose keys this check cannot know.
func target(t reflect.Type) reflect.Type {
	for t != nil && t.Kind() == reflect.Pointer {
		if t.Implements(jsonUnmarshaler) || t.Implements(textUnmarshaler) {
			return nil
		}
		t = t.Elem()
	}
	if t != nil && (reflect.PointerTo(t).Implements(jsonUnmarshaler) || reflect.PointerTo(t).Implements(textUnmarshaler)) {
		return nil
	}
	return t
}

func (k *keyChecker) value(t reflect.Type, path string) error {
	tok, err := k.dec.Token()
	if err != nil {
		return err
	}
	t = target(t)
	switch tok {
	case json.Delim('{'):
		return k.object(t, path)
	case json.Delim('['):
		var elem reflect.Type
		if t != nil && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) {
			elem = t.Elem()
		}
		for i := 0; k.dec.More(); i++ {
			if err := k.value(elem, path+"["+strconv.Itoa(i)+"]"); err != nil {
				return err
			}
		}
		_, err := k.dec.Token() // ']'
		return err
	}
	return nil
}

func (k *keyChecker) object(t reflect.Type, path string) error {
	var fields map[string]reflect.Type
	if t != nil && t.Kind() == reflect.Struct {
		fields = jsonFields(t)
	}
	seen := map[string]bool{}
	for k.dec.More() {
		tok, err := k.dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string)
		where := key
		if path != "" {
			where = path + "." + key
		}
		if seen[key] {
			return rebound.Errorf(rebound.EINVALID, "invalid request body: duplicate key %q; give each field once", where)
		}
		seen[key] = true
		var child reflect.Type
		switch {
		case fields != nil:
			ft, ok := fields[key]
			if !ok {
				for name := range fields {
					if strings.EqualFold(name, key) {
						return rebound.Errorf(rebound.EINVALID, "invalid request body: unknown field %q; field names are case-sensitive: use %q", where, name)
					}
				}
				return rebound.Errorf(rebound.EINVALID, "invalid request body: unknown field %q", where)
			}
			child = ft
		case t != nil && t.Kind() == reflect.Map:
			child = t.Elem()
		}
		if err := k.value(child, where); err != nil {
			return err
		}
	}
	_, err := k.dec.Token() // '}'
	return err
}

var fieldCache sync.Map // reflect.Type -> map[string]reflect.Type

// jsonFields maps the JSON names of a struct's fields, as encoding/json
// names them (tag name, else Go name; untagged embedded structs promoted),
// to their types.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	if m, ok := fieldCache.Load(t); ok {
		return m.(map[string]reflect.Type)
	}
	m := map[string]reflect.Type{}
	addFields(m, t)
	fieldCache.Store(t, m)
	return m
}

func addFields(m map[string]reflect.Type, t reflect.Type) {
	var embedded []reflect.Type
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, _, _ := strings.Cut(tag, ",")
		ft := f.Type
		if ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if f.Anonymous && name == "" && ft.Kind() == reflect.Struct {
			embedded = append(embedded, ft)
			continue
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		m[name] = f.Type
	}
	// An outer field hides a promoted one of the same name.
	for _, et := range embedded {
		inner := map[string]reflect.Type{}
		addFields(inner, et)
		for name, ft := range inner {
			if _, ok := m[name]; !ok {
				m[name] = ft
			}
		}
	}
}

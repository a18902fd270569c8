package http

import (
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

// TestStrictJSON: a key twice in an object, or a key in another case than
// its field's, is refused with 400 naming the key, at any depth, and the
// service is not called; the exact body is accepted and means what it says.
func TestStrictJSON(t *testing.T) {
	e := newEnv(t)
	auth := "Bearer " + testToken
	e.fake.machine = testMachine()
	for _, tc := range []struct{ name, path, body, msg string }{
		{"duplicate", "/api/v1/machines", `{"name":"u1","name":"u2","site":"a","disks":[1]}`, `duplicate key "name"`},
		{"duplicate last", "/api/v1/machines", `{"name":"u1","site":"a","disks":[1],"site":"b"}`, `duplicate key "site"`},
		{"case", "/api/v1/machines", `{"Name":"u1","site":"a","disks":[1]}`, `unknown field "Name"; field names are case-sensitive: use "name"`},
		{"case and exact", "/api/v1/machines", `{"name":"u1","NAME":"u2","site":"a","disks":[1]}`, `unknown field "NAME"; field names are case-sensitive: use "name"`},
		{"nested duplicate", "/api/v1/machines", `{"name":"u1","site":"a","disks":[1],"vm":{"cpus":1,"memoryMiB":64,"cpus":8}}`, `duplicate key "vm.cpus"`},
		{"nested case", "/api/v1/machines", `{"name":"u1","site":"a","disks":[1],"vm":{"cpus":1,"memoryMIB":64}}`, `unknown field "vm.memoryMIB"; field names are case-sensitive: use "memoryMiB"`},
		{"nested unknown", "/api/v1/machines", `{"name":"u1","site":"a","disks":[1],"vm":{"cpus":1,"ram":64}}`, `unknown field "ram"`},
		{"duplicate duration", "/api/v1/policies/gold", `{"retention":"1h","retention":"2h"}`, `duplicate key "retention"`},
		{"case in verb", "/api/v1/machines/web/protect", `{"To":"b"}`, `use "to"`},
		{"verb duplicate", "/api/v1/machines/web/failover", `{"point":"latest","planned":true,"point":"p-1"}`, `duplicate key "point"`},
	} {
		e.fake.call = ""
		method := "POST"
		if strings.HasPrefix(tc.path, "/api/v1/policies") {
			method = "PUT"
		}
		st, _, er, body := e.raw(t, method, tc.path, auth, "", strings.NewReader(tc.body))
		if st != 400 || er.Error.Code != rebound.EINVALID || !strings.Contains(er.Error.Message, tc.msg) {
			t.Errorf("%s: %d %s, want 400 containing %q", tc.name, st, body, tc.msg)
		}
		if c, _ := e.fake.last(); c != "" {
			t.Errorf("%s: service was called (%s)", tc.name, c)
		}
	}

	// The exact body goes through, nested object included.
	st, _, _, body := e.raw(t, "POST", "/api/v1/machines", auth, "", strings.NewReader(
		`{"name":"u1","site":"a","disks":[1,2],"vm":{"cpus":2,"memoryMiB":64}}`))
	if st != 201 {
		t.Fatalf("exact body: %d %s", st, body)
	}
	c, args := e.fake.last()
	if c != "CreateMachine" {
		t.Fatalf("exact body: call %q", c)
	}
	if req := args[0].(rebound.CreateMachineRequest); req.Name != "u1" || req.VM == nil || req.VM.MemoryMiB != 64 || len(req.Disks) != 2 {
		t.Fatalf("exact body decoded as %+v", req)
	}
}

// TestCheckKeys covers the shapes no route body has yet: arrays of
// objects, maps, embedded structs, untyped values and self-decoding types.
func TestCheckKeys(t *testing.T) {
	type Inner struct {
		Size int `json:"size"`
	}
	type Embedded struct {
		Label string `json:"label"`
	}
	type body struct {
		Embedded
		Disks  []Inner           `json:"disks"`
		ByName map[string]Inner  `json:"byName"`
		Any    any               `json:"any"`
		Every  *rebound.Duration `json:"every"`
		Plain  int               // no tag: the Go name
		Skip   int               `json:"-"`
	}
	for _, tc := range []struct{ body, err string }{
		{`{"label":"a","disks":[{"size":1},{"size":2}],"byName":{"a":{"size":1},"B":{"size":2}},"any":{"x":1,"X":2},"every":"1h","Plain":3}`, ""},
		{`{"disks":[{"size":1},{"size":2,"size":3}]}`, `duplicate key "disks[1].size"`},
		{`{"disks":[{"Size":1}]}`, `unknown field "disks[0].Size"; field names are case-sensitive: use "size"`},
		{`{"byName":{"a":{"size":1},"a":{"size":2}}}`, `duplicate key "byName.a"`},
		{`{"byName":{"a":{"SIZE":1}}}`, `use "size"`},
		{`{"Label":"a"}`, `unknown field "Label"; field names are case-sensitive: use "label"`},
		{`{"plain":1}`, `use "Plain"`},
		{`{"any":{"x":1,"x":2}}`, `duplicate key "any.x"`},
		{`{"any":[{"x":1},{"y":1,"y":2}]}`, `duplicate key "any[1].y"`},
		{`{"skip":1}`, `unknown field "skip"`},
	} {
		var v body
		err := checkKeys([]byte(tc.body), &v)
		if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err) || rebound.ErrorCode(err) != rebound.EINVALID) {
			t.Errorf("%s: %v, want %q", tc.body, err, tc.err)
		}
	}
}

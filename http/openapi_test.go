package http

import (
	"encoding/json"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/rebound-dr/rebound"
)

type openAPIDoc struct {
	OpenAPI    string                                `json:"openapi"`
	Paths      map[string]map[string]json.RawMessage `json:"paths"`
	Components struct {
		Schemas         map[string]schema          `json:"schemas"`
		SecuritySchemes map[string]json.RawMessage `json:"securitySchemes"`
	} `json:"components"`
}

type schema struct {
	Properties map[string]json.RawMessage `json:"properties"`
	Required   []string                   `json:"required"`
}

func loadOpenAPI(t *testing.T) openAPIDoc {
	t.Helper()
	var doc openAPIDoc
	dec := json.NewDecoder(strings.NewReader(string(openAPI)))
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("openapi.json does not parse: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.0.") {
		t.Fatalf("openapi version %q", doc.OpenAPI)
	}
	if _, ok := doc.Components.SecuritySchemes["bearerAuth"]; !ok {
		t.Fatal("no bearerAuth security scheme")
	}
	return doc
}

// TestOpenAPICoversRoutes checks the document and the mux agree: every
// route is documented and every documented operation is routed.
func TestOpenAPICoversRoutes(t *testing.T) {
	doc := loadOpenAPI(t)
	routed := map[string]bool{"GET /metrics": true}
	for _, rt := range (&Server{}).routes() {
		routed[rt.method+" "+rt.path] = true
	}
	for r := range routed {
		method, path, _ := strings.Cut(r, " ")
		if _, ok := doc.Paths[path][strings.ToLower(method)]; !ok {
			t.Errorf("route %s is not in openapi.json", r)
		}
	}
	for path, ops := range doc.Paths {
		for method := range ops {
			if method == "parameters" {
				continue
			}
			if !routed[strings.ToUpper(method)+" "+path] {
				t.Errorf("openapi.json documents %s %s, which is not routed", method, path)
			}
		}
	}
}

// TestOpenAPIRefsResolve checks every $ref names a defined schema.
func TestOpenAPIRefsResolve(t *testing.T) {
	doc := loadOpenAPI(t)
	var walk func(v any)
	n := 0
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if ref, ok := v["$ref"].(string); ok {
				n++
				name := strings.TrimPrefix(ref, "#/components/schemas/")
				if _, ok := doc.Components.Schemas[name]; !ok || name == ref {
					t.Errorf("unresolved $ref %q", ref)
				}
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	var raw any
	json.Unmarshal(openAPI, &raw)
	walk(raw)
	if n < 20 {
		t.Fatalf("only %d refs found", n)
	}
}

// TestOpenAPISchemasMatchTypes checks each schema lists exactly the JSON
// fields of its Go type, so the document cannot drift from the model.
func TestOpenAPISchemasMatchTypes(t *testing.T) {
	doc := loadOpenAPI(t)
	for name, v := range map[string]any{
		"Machine": rebound.Machine{}, "Disk": rebound.Disk{}, "Job": rebound.Job{}, "JobStep": rebound.JobStep{},
		"RecoveryPoint": rebound.RecoveryPoint{}, "Policy": rebound.Policy{}, "Site": rebound.Site{},
		"Event": rebound.Event{}, "Protection": rebound.Protection{}, "FailoverInfo": rebound.FailoverInfo{},
		"TestFailover": rebound.TestFailover{}, "CreateMachineRequest": rebound.CreateMachineRequest{},
		"ProtectRequest": protectBody{}, "CreatePointRequest": pointBody{}, "FailoverRequest": failoverBody{},
		"ChangePointRequest": changePointBody{}, "TestFailoverRequest": testFailoverBody{},
		"ReprotectRequest": reprotectBody{}, "FailbackRequest": failbackBody{}, "UnprotectRequest": unprotectBody{},
		"PreflightReport": rebound.PreflightReport{}, "PreflightCheck": rebound.PreflightCheck{}, "DetachedCopy": rebound.DetachedCopy{},
		"TokenResponse": tokenBody{}, "Error": errorResponse{}, "Health": healthBody{},
		"SiteMachineRole":   rebound.SiteMachineRole{},
		"SetMachineRequest": setMachineBody{}, "MachineSettings": rebound.MachineSettings{},
		"Plan": rebound.Plan{}, "PlanStage": rebound.PlanStage{}, "PlanAction": rebound.PlanAction{}, "BootCheck": rebound.BootCheck{},
		"PlanRunRequest": planRunBody{}, "PlanPreflight": rebound.PlanPreflight{}, "PlanPreflightRow": rebound.PlanPreflightRow{},
		"PlanProgress": rebound.PlanProgress{}, "StageProgress": rebound.StageProgress{}, "MemberProgress": rebound.MemberProgress{},
		"ActionProgress":   rebound.ActionProgress{},
		"JoinTokenRequest": rebound.JoinTokenRequest{}, "SiteRemoval": rebound.SiteRemoval{},
		"Group":     rebound.Group{},
		"Principal": rebound.Principal{}, "User": rebound.User{}, "APIToken": rebound.APIToken{},
		"CreateUserRequest": rebound.CreateUserRequest{}, "CreateUserResult": rebound.CreateUserResult{},
		"SetRoleRequest": setRoleBody{}, "SetPasswordRequest": setPasswordBody{}, "SetPasswordResult": setPasswordResult{},
		"CreateTokenRequest": createTokenBody{}, "CreateTokenResult": rebound.CreateTokenResult{},
		"AuditEntry": rebound.AuditEntry{},
	} {
		s, ok := doc.Components.Schemas[name]
		if !ok {
			t.Errorf("schema %s missing", name)
			continue
		}
		var want, got []string
		typ := reflect.TypeOf(v)
		for i := range typ.NumField() {
			tag, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
			if tag == "-" { // not on the wire (Event.EventID)
				continue
			}
			want = append(want, tag)
		}
		for p := range s.Properties {
			got = append(got, p)
		}
		sort.Strings(want)
		sort.Strings(got)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("schema %s properties %v, Go type has %v", name, got, want)
		}
		for _, r := range s.Required {
			if _, ok := s.Properties[r]; !ok {
				t.Errorf("schema %s requires unknown %q", name, r)
			}
		}
	}
}

// TestOpenAPIRoles checks each operation's x-rebound-role is its route's
// role, so the document tells clients what the server enforces.
func TestOpenAPIRoles(t *testing.T) {
	var doc struct {
		Paths map[string]map[string]struct {
			Role      string                     `json:"x-rebound-role"`
			Responses map[string]json.RawMessage `json:"responses"`
		} `json:"paths"`
	}
	if err := json.Unmarshal(openAPI, &doc); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, rt := range append((&Server{}).routes(), route{"GET", "/metrics", viewer, nil}) {
		op := doc.Paths[rt.path][strings.ToLower(rt.method)]
		want := string(rt.role)
		if rt.role == public {
			want = ""
		}
		if op.Role != want {
			t.Errorf("%s %s: x-rebound-role %q, route needs %q", rt.method, rt.path, op.Role, want)
		}
		if _, ok := op.Responses["403"]; !ok && rt.role != public && rt.role != viewer {
			t.Errorf("%s %s needs %s but documents no 403", rt.method, rt.path, rt.role)
		}
		n++
	}
	if n < 60 {
		t.Fatalf("only %d routes", n)
	}
}

package rebound

import (
	"strings"
	"testing"
)

func TestValidatePlan(t *testing.T) {
	ok := Plan{Name: "shop", Stages: []PlanStage{
		{Name: "data", Machines: []string{"db"}, After: []PlanAction{{Script: "/bin/true", Verbs: []string{"failover"}}}},
		{Name: "web", Machines: []string{"web1"}, Before: []PlanAction{{Manual: "DNS", Directions: []string{"away"}}}},
	}}
	if err := ValidatePlan(ok); err != nil {
		t.Fatalf("valid plan refused: %v", err)
	}
	for _, tc := range []struct {
		name string
		edit func(p *Plan)
		want string
	}{
		{"no name", func(p *Plan) { p.Name = "" }, "no name"},
		{"no stages", func(p *Plan) { p.Stages = nil }, "no stages"},
		{"stage without name", func(p *Plan) { p.Stages[1].Name = "" }, "stage 2 has no name"},
		{"duplicate stage", func(p *Plan) { p.Stages[1].Name = "data" }, "two stages"},
		{"empty stage", func(p *Plan) { p.Stages[1].Machines = nil }, "no machines or groups"},
		{"member twice", func(p *Plan) { p.Stages[1].Machines = []string{"db"} }, "already in stage data"},
		{"script and manual", func(p *Plan) { p.Stages[0].After[0].Manual = "x" }, "either script: or manual:"},
		{"neither", func(p *Plan) { p.Stages[0].After[0].Script = "" }, "either script: or manual:"},
		{"bad verb", func(p *Plan) { p.Stages[0].After[0].Verbs = []string{"explode"} }, `unknown verb "explode"`},
		{"bad direction", func(p *Plan) { p.Stages[1].Before[0].Directions = []string{"sideways"} }, `unknown direction "sideways"`},
		{"negative timeout", func(p *Plan) { p.Stages[0].After[0].Timeout = -1 }, "negative timeout"},
	} {
		p := ok
		p.Stages = []PlanStage{ok.Stages[0], ok.Stages[1]}
		p.Stages[0].After = []PlanAction{ok.Stages[0].After[0]}
		p.Stages[1].Before = []PlanAction{ok.Stages[1].Before[0]}
		tc.edit(&p)
		err := ValidatePlan(p)
		if err == nil || ErrorCode(err) != EINVALID || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want invalid with %q", tc.name, err, tc.want)
		}
	}
}

func TestPlanActionRuns(t *testing.T) {
	a := PlanAction{Script: "x", Verbs: []string{"failover", "failback"}, Directions: []string{"away"}}
	for _, tc := range []struct {
		verb, dir string
		want      bool
	}{{"failover", "away", true}, {"failback", "away", true}, {"failover", "home", false}, {"commit", "away", false}} {
		if got := a.Runs(tc.verb, tc.dir); got != tc.want {
			t.Errorf("Runs(%s, %s) = %v, want %v", tc.verb, tc.dir, got, tc.want)
		}
	}
	if !(PlanAction{Script: "x"}).Runs("commit", "home") {
		t.Error("an action without filters does not run")
	}
}

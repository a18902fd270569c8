package main

import (
	"context"
	"sort"
	"strings"
	"time"

	"github.com/rebound-dr/rebound"
	"github.com/spf13/cobra"
)

// Shell completion: cobra's `rebound completion bash|zsh|fish|powershell`
// writes the script; the script calls back into `rebound __complete`,
// which runs the completers below against the configured server. One
// table says which noun each argument and flag names, so a new noun
// (plans) is a completer and a few table rows.

// noun is a kind of object completion can offer.
type noun string

const (
	nounMachine noun = "machine"
	nounSite    noun = "site"
	nounPoint   noun = "point" // of the machine named by the first argument
	nounPolicy  noun = "policy"
	nounGroup   noun = "group"
	nounUser    noun = "user"
	nounToken   noun = "token" // the caller's own tokens' IDs
)

// argNouns: the noun of a command's first argument, by command path.
var argNouns = map[string]noun{
	"machine show": nounMachine, "machine delete": nounMachine, "machine start": nounMachine,
	"machine stop": nounMachine, "machine console": nounMachine, "machine set": nounMachine,
	"protect": nounMachine, "points": nounMachine, "point create": nounMachine,
	"failover": nounMachine, "failover change-point": nounMachine, "failover cancel": nounMachine,
	"commit": nounMachine, "reprotect": nounMachine, "failback": nounMachine, "preflight": nounMachine,
	"test-failover": nounMachine, "test-failover cleanup": nounMachine, "unprotect": nounMachine,
	"site show":  nounSite,
	"policy set": nounPolicy, "policy delete": nounPolicy,
	"group show": nounGroup, "group remove-machine": nounGroup,
	"user delete": nounUser, "user set-role": nounUser, "user passwd": nounUser,
	"token revoke": nounToken,
}

// flagNouns: the noun of a flag's value, whatever the command.
var flagNouns = map[string]noun{
	"machine": nounMachine,
	"site":    nounSite, "to": nounSite, "keep": nounSite,
	"point":  nounPoint,
	"policy": nounPolicy,
	"group":  nounGroup,
	"user":   nounUser,
}

// completionTimeout bounds a completion's call to the server: a shell
// waiting on a TAB must not hang.
const completionTimeout = 5 * time.Second

// addCompletions sets the completers on every command of the tree.
func (c *CLI) addCompletions(root *cobra.Command) {
	var walk func(cmd *cobra.Command)
	walk = func(cmd *cobra.Command) {
		if n, ok := argNouns[cmdPath(cmd)]; ok && cmd.ValidArgsFunction == nil {
			cmd.ValidArgsFunction = c.completer(n, true)
		}
		for name, n := range flagNouns {
			if cmd.Flags().Lookup(name) != nil {
				if _, exists := cmd.GetFlagCompletionFunc(name); !exists {
					_ = cmd.RegisterFlagCompletionFunc(name, c.completer(n, false))
				}
			}
		}
		for _, sub := range cmd.Commands() {
			walk(sub)
		}
	}
	walk(root)
}

// completer returns a completion function offering names of n. For an
// argument it completes the first one only.
func (c *CLI) completer(n noun, arg bool) cobra.CompletionFunc {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
		if arg && len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		ctx, cancel := context.WithTimeout(context.Background(), completionTimeout)
		defer cancel()
		if g := cmd.Flags().Lookup("group"); n == nounPoint && len(args) == 0 && g != nil && g.Value.String() != "" {
			args = []string{g.Value.String()} // a group's points: the verb's --group
		}
		names, err := c.names(ctx, n, args)
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
		}
		var out []string
		for _, s := range names {
			if strings.HasPrefix(s, toComplete) {
				out = append(out, s)
			}
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	}
}

// maxPointCompletions: a machine can hold 17,000 points a day; completion
// offers the selectors and the newest of the matching IDs.
const maxPointCompletions = 200

// names lists the objects of n from the server.
func (c *CLI) names(ctx context.Context, n noun, args []string) ([]string, error) {
	svc, err := c.Service()
	if err != nil {
		return nil, err
	}
	var out []string
	switch n {
	case nounMachine:
		ms, err := svc.ListMachines(ctx)
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			out = append(out, m.Name)
		}
	case nounSite:
		ss, err := svc.ListSites(ctx)
		if err != nil {
			return nil, err
		}
		for _, s := range ss {
			out = append(out, s.Name)
		}
	case nounPolicy:
		ps, err := svc.ListPolicies(ctx)
		if err != nil {
			return nil, err
		}
		for _, p := range ps {
			out = append(out, p.Name)
		}
	case nounGroup:
		g, ok := svc.(rebound.GroupService)
		if !ok {
			return nil, nil
		}
		gs, err := g.ListGroups(ctx)
		if err != nil {
			return nil, err
		}
		for _, v := range gs {
			out = append(out, v.Name)
		}
	case nounUser, nounToken:
		u, ok := svc.(userClient)
		if !ok {
			return nil, nil
		}
		if n == nounToken {
			ts, err := u.ListTokens(ctx, "", false)
			if err != nil {
				return nil, err
			}
			for _, t := range ts {
				out = append(out, t.ID)
			}
			break
		}
		us, err := u.ListUsers(ctx) // an admin's: others get no names
		if err != nil {
			return nil, err
		}
		for _, x := range us {
			out = append(out, x.Name)
		}
	case nounPoint:
		out = []string{rebound.PointLatest, rebound.PointLatestProcessed, rebound.PointLatestAppConsistent}
		if len(args) == 0 {
			return out, nil
		}
		ps, err := svc.ListPoints(ctx, args[0])
		if err != nil {
			return out, nil // the selectors still help
		}
		if len(ps) > maxPointCompletions {
			ps = ps[len(ps)-maxPointCompletions:]
		}
		for i := len(ps) - 1; i >= 0; i-- { // newest first
			out = append(out, ps[i].ID)
		}
		return out, nil
	}
	sort.Strings(out)
	return out, nil
}

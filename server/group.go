package server

import (
	"context"

	"github.com/rebound-dr/rebound"
)

var _ rebound.GroupService = (*Server)(nil)

// ListGroups returns every replication group.
func (s *Server) ListGroups(ctx context.Context) ([]rebound.Group, error) {
	return nil, rebound.Errorf(rebound.EINVALID, "groups: not built yet")
}

// GetGroup returns a replication group.
func (s *Server) GetGroup(ctx context.Context, name string) (*rebound.Group, error) {
	return nil, rebound.Errorf(rebound.ENOTFOUND, "group %q not found", name)
}

// RemoveGroupMember takes a machine out of its group.
func (s *Server) RemoveGroupMember(ctx context.Context, group, machine string) (*rebound.Job, error) {
	return nil, rebound.Errorf(rebound.EINVALID, "groups: not built yet")
}

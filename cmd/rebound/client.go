package main

import "github.com/rebound-dr/rebound"

// defaultNewService dials the server's REST API.
func defaultNewService(cfg *ClientConfig) (rebound.Service, error) {
	return nil, rebound.Errorf(rebound.EINTERNAL, "no HTTP client built in (server %s)", cfg.Server)
}

package main

import (
	"github.com/rebound-dr/rebound"
	rhttp "github.com/rebound-dr/rebound/http"
)

// defaultNewService dials the server's REST API. cfg.CAPEM was read from
// cfg.CAFile when the config was resolved.
func defaultNewService(cfg *ClientConfig) (rebound.Service, error) {
	c, err := rhttp.NewClient(cfg.Server, cfg.Token, cfg.CAPEM)
	if err != nil {
		return nil, err // not a typed-nil Service
	}
	return c, nil
}

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/rebound-dr/rebound/internal/fsutil"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/rebound-dr/rebound"
)

// ClientConfig is how the CLI reaches the server. On disk it is a small JSON
// file: {"server":"https://127.0.0.1:8440","token":"...","caFile":"/path/ca.crt"}.
// Server may name several servers of one control plane, comma-separated
// ("https://vault1:8440,https://vault2:8440"): the client uses the first
// that answers (http.Client.Fallback).
type ClientConfig struct {
	Server string `json:"server"`
	Token  string `json:"token,omitempty"`
	CAFile string `json:"caFile,omitempty"`
	// CAPEM is the CA certificate (PEM) the server's certificate chains to.
	// It is read from CAFile when the config is resolved; WriteClientConfig
	// stores it as ca.crt next to the config when CAFile is empty.
	CAPEM []byte `json:"-"`
	// ConsoleUser and ConsolePassword log in to the web console at Server
	// (`rebound up` writes its admin's; the file is 0600).
	ConsoleUser     string `json:"consoleUser,omitempty"`
	ConsolePassword string `json:"consolePassword,omitempty"`
	// tokenFrom says where Token came from, for error messages.
	tokenFrom string
}

// Environment variables that override the config file.
const (
	EnvServer = "REBOUND_SERVER"
	EnvToken  = "REBOUND_TOKEN"
	EnvCA     = "REBOUND_CA" // path to the CA certificate file
)

var errNoServer = rebound.Errorf(rebound.EINVALID,
	"no Rebound server configured: run `rebound up`, or set REBOUND_SERVER and REBOUND_TOKEN")

// ClientConfigPath returns $XDG_CONFIG_HOME/rebound/config, or
// ~/.config/rebound/config when XDG_CONFIG_HOME is unset.
func ClientConfigPath() (string, error) {
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find config dir: %w", err)
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "rebound", "config"), nil
}

// WriteClientConfig writes cfg to ClientConfigPath with mode 0600, creating
// its directory. If cfg has CAPEM but no CAFile, the PEM is written to
// ca.crt in the same directory and referenced. It returns the config path.
func WriteClientConfig(cfg ClientConfig) (path string, err error) {
	path, err = ClientConfigPath()
	if err != nil {
		return "", err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create config dir: %w", err)
	}
	if cfg.CAFile == "" && len(cfg.CAPEM) > 0 {
		cfg.CAFile = filepath.Join(dir, "ca.crt")
		if err := fsutil.WriteFileAtomic(cfg.CAFile, cfg.CAPEM, 0o644); err != nil {
			return "", err
		}
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", err
	}
	if err := fsutil.WriteFileAtomic(path, append(b, '\n'), 0o600); err != nil {
		return "", err
	}
	return path, nil
}

// writeFileAtomic replaces path with data so a crash leaves the old or the
// new file, never a torn one.

// readClientConfigFile reads the config file; a missing file is an empty
// config.
func readClientConfigFile() (ClientConfig, error) {
	var cfg ClientConfig
	path, err := ClientConfigPath()
	if err != nil {
		return cfg, err
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return cfg, nil
	} else if err != nil {
		return cfg, fmt.Errorf("read client config: %w", err)
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cfg, rebound.Errorf(rebound.EINVALID, "client config %s: %v", path, err)
	}
	return cfg, nil
}

// loadClientConfig merges the config file, the environment and the given
// overrides (flags), later ones winning, without validating.
func loadClientConfig(server, token, caFile string) (ClientConfig, error) {
	cfg, err := readClientConfigFile()
	if err != nil {
		return cfg, err
	}
	override := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	if cfg.Token != "" {
		path, _ := ClientConfigPath()
		cfg.tokenFrom = "the config file " + path
	}
	if os.Getenv(EnvToken) != "" {
		cfg.tokenFrom = EnvToken
	}
	if token != "" {
		cfg.tokenFrom = "--token"
	}
	override(&cfg.Server, os.Getenv(EnvServer))
	override(&cfg.Token, os.Getenv(EnvToken))
	override(&cfg.CAFile, os.Getenv(EnvCA))
	override(&cfg.Server, server)
	override(&cfg.Token, token)
	override(&cfg.CAFile, caFile)
	return cfg, nil
}

// finish checks that a server is set and reads the CA file.
func (cfg *ClientConfig) finish() error {
	if cfg.Server == "" {
		return errNoServer
	}
	if cfg.CAFile != "" && len(cfg.CAPEM) == 0 {
		b, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return rebound.Errorf(rebound.EINVALID, "read CA file: %v", err)
		}
		cfg.CAPEM = b
	}
	return nil
}

// LoadClientConfig returns the client config from the config file with the
// REBOUND_SERVER, REBOUND_TOKEN and REBOUND_CA environment variables
// applied, and the CA certificate read into CAPEM. It fails with a clear
// error when no server is configured.
func LoadClientConfig() (ClientConfig, error) {
	cfg, err := loadClientConfig("", "", "")
	if err != nil {
		return cfg, err
	}
	return cfg, cfg.finish()
}

// Config returns the client config: file < environment < flags.
func (c *CLI) Config() (ClientConfig, error) {
	cfg, err := loadClientConfig(c.server, c.token, c.caFile)
	if err != nil {
		return cfg, err
	}
	c.tokenFrom = cfg.tokenFrom
	return cfg, cfg.finish()
}

// explainAuth adds to a refused token where it came from and how to get
// a good one.
func (c *CLI) explainAuth(err error) error {
	if rebound.ErrorCode(err) != rebound.EUNAUTHORIZED {
		return err
	}
	from := "nowhere: no token is set"
	if c.tokenFrom != "" {
		from = c.tokenFrom
	}
	return rebound.Errorf(rebound.EUNAUTHORIZED, "%s (token from %s): use the admin token of the server: the file `rebound server --admin-token-file FILE` writes on its host (delete it and restart the server for a new one), or run `rebound up` again, which writes its token to the config file; or a token of your own user (an admin creates it: rebound token create --user NAME --name laptop); pass it with --token or REBOUND_TOKEN",
		rebound.ErrorMessage(err), from)
}

// Package secret holds what every store does the same way with secrets:
// token generation and hashing, password hashing (argon2id) and the rules
// for user names and passwords.
package secret

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"sync"

	"golang.org/x/crypto/argon2"

	"github.com/rebound-dr/rebound"
)

// Prefixes make a leaked secret recognizable (and greppable).
const (
	APITokenPrefix    = "rbt_"
	EnrollTokenPrefix = "rbe_"
	SessionPrefix     = "rbs_"
)

// MinPasswordLen is the shortest password a store takes.
const MinPasswordLen = 12

// maxPasswordLen bounds the work one login attempt can ask for.
const maxPasswordLen = 1024

// New returns prefix and 256 random bits.
func New(prefix string) (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("random token: %w", err)
	}
	return prefix + base64.RawURLEncoding.EncodeToString(b[:]), nil
}

// Hash is what a store keeps of a token: a leak of the store does not
// leak usable tokens. Tokens carry 256 random bits, so an unsalted hash
// is enough.
func Hash(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(h[:])
}

// ID returns 12 random hex digits (a token's public ID).
func ID() (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("random ID: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

var userNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._@-]*$`)

// ValidUserName checks a user name.
func ValidUserName(name string) error {
	if len(name) == 0 || len(name) > 63 || !userNameRE.MatchString(name) {
		return rebound.Errorf(rebound.EINVALID, "invalid user name %q: use 1-63 lower-case letters, digits, '.', '_', '@' and '-'", name)
	}
	return nil
}

// ValidPassword checks a new password's length.
func ValidPassword(pw string) error {
	if len(pw) < MinPasswordLen {
		return rebound.Errorf(rebound.EINVALID, "password is too short: use at least %d characters", MinPasswordLen)
	}
	if len(pw) > maxPasswordLen {
		return rebound.Errorf(rebound.EINVALID, "password is too long: use at most %d characters", maxPasswordLen)
	}
	return nil
}

// Password hashing: argon2id with the parameters OWASP recommends (19 MiB,
// two passes, one lane), a 16-byte random salt, stored in the PHC string
// format so that the parameters can change without a migration.
const (
	argonTime    = 2
	argonMemory  = 19 * 1024 // KiB
	argonThreads = 1
	argonKeyLen  = 32
)

// HashPassword returns the PHC string of pw with a new salt.
func HashPassword(pw string) (string, error) {
	var salt [16]byte
	if _, err := rand.Read(salt[:]); err != nil {
		return "", fmt.Errorf("random salt: %w", err)
	}
	key := argon2.IDKey([]byte(pw), salt[:], argonTime, argonMemory, argonThreads, argonKeyLen)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, argonMemory, argonTime, argonThreads,
		b64.EncodeToString(salt[:]), b64.EncodeToString(key)), nil
}

// dummyHash is compared against when the user does not exist or has no
// password, so that an unknown name takes as long as a wrong password.
// Made at first use: every CLI run links this package.
var dummyHash = sync.OnceValue(func() string {
	h, _ := HashPassword("rebound-no-such-user")
	return h
})

// CheckPassword says whether pw matches encoded (a PHC string). An empty
// encoded (no such user, or no password) still costs one hash, and fails.
func CheckPassword(encoded, pw string) bool {
	if len(pw) > maxPasswordLen {
		return false
	}
	if encoded == "" {
		checkPHC(dummyHash(), pw)
		return false
	}
	return checkPHC(encoded, pw)
}

func checkPHC(encoded, pw string) bool {
	parts := strings.Split(encoded, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return false
	}
	var v int
	var m, t uint32
	var p uint8
	if _, err := fmt.Sscanf(parts[2], "v=%d", &v); err != nil || v != argon2.Version {
		return false
	}
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &m, &t, &p); err != nil || p == 0 || t == 0 {
		return false
	}
	b64 := base64.RawStdEncoding
	salt, err1 := b64.DecodeString(parts[4])
	want, err2 := b64.DecodeString(parts[5])
	if err1 != nil || err2 != nil || len(want) == 0 {
		return false
	}
	got := argon2.IDKey([]byte(pw), salt, t, m, p, uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1
}

// NewUser checks a new user's name, role and password and returns the
// password's hash and, when req gave none, the generated password (shown
// once).
func NewUser(req rebound.CreateUserRequest) (hash, generated string, err error) {
	if err := ValidUserName(req.Name); err != nil {
		return "", "", err
	}
	if _, err := rebound.ParseRole(string(req.Role)); err != nil {
		return "", "", err
	}
	pw := req.Password
	if pw == "" {
		pw = GeneratePassword()
		generated = pw
	} else if err := ValidPassword(pw); err != nil {
		return "", "", err
	}
	if hash, err = HashPassword(pw); err != nil {
		return "", "", err
	}
	return hash, generated, nil
}

// UserExists is the ECONFLICT of a user name that is taken.
func UserExists(name string) error {
	return rebound.Errorf(rebound.ECONFLICT, "user %q already exists: change it with rebound user set-role or rebound user passwd", name)
}

// TokenName checks an API token's name and returns it trimmed.
func TokenName(name string) (string, error) {
	name = strings.TrimSpace(name)
	if name == "" {
		return "", rebound.Errorf(rebound.EINVALID, "token name is empty: name it after its use (--name ci)")
	}
	if len(name) > 100 {
		return "", rebound.Errorf(rebound.EINVALID, "token name is longer than 100 characters")
	}
	return name, nil
}

// GeneratePassword returns a random password of 26 characters (128 bits).
func GeneratePassword() string { return rand.Text() }

// ErrBadLogin is the one answer to an unknown user, a user without a
// password and a wrong password.
var ErrBadLogin = rebound.Errorf(rebound.EUNAUTHORIZED, "invalid user name or password")

// Article names a certificate role in a sentence: "an agent".
func Article(role string) string {
	switch role {
	case "agent":
		return "an agent"
	case "nbd":
		return "an NBD client"
	}
	return "a " + role
}

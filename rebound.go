// Package rebound holds Rebound's domain types and the contracts between its
// parts. Implementations live in one package per dependency (nbd/, wal/,
// journal/, capture/, grpc/, sqlite/, http/); wiring lives only in cmd/.
package rebound

import (
	"errors"
	"fmt"
)

// Error codes. They are translated to HTTP statuses, gRPC codes and CLI exit
// codes only at the edges.
const (
	EINVALID      = "invalid"      // bad request from the caller
	ENOTFOUND     = "not_found"    // no such object
	ECONFLICT     = "conflict"     // state does not allow the operation
	EUNAVAILABLE  = "unavailable"  // a needed peer or site is not reachable
	EUNAUTHORIZED = "unauthorized" // missing or bad credentials
	EFORBIDDEN    = "forbidden"    // the caller's role does not allow the operation
	EINTERNAL     = "internal"     // a bug or an unexpected failure
	ENOSPACE      = "no_space"     // the server's data disk is full: its store cannot be written
)

// Error is an error with a code and a message meant for the operator.
type Error struct {
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

// Errorf returns an *Error with the given code.
func Errorf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// ErrorCode returns the code of the first *Error in err's chain, EINTERNAL
// for any other non-nil error and "" for nil.
func ErrorCode(err error) string {
	var e *Error
	if err == nil {
		return ""
	} else if errors.As(err, &e) {
		return e.Code
	}
	return EINTERNAL
}

// ErrorMessage returns the operator-facing message of err.
// The parts of a joined error (errors.Join) are each translated and
// joined with "; ", so none of them is lost.
func ErrorMessage(err error) string {
	var e *Error
	if err == nil {
		return ""
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var msg string
		for _, part := range j.Unwrap() {
			if m := ErrorMessage(part); m != "" {
				if msg != "" {
					msg += "; "
				}
				msg += m
			}
		}
		return msg
	}
	if errors.As(err, &e) {
		return e.Message
	}
	return err.Error()
}

// Package nbd implements a Network Block Device server (fixed newstyle
// handshake, simple or structured replies, base:allocation block status)
// and a client (simple replies) as described in the NBD protocol,
// NetworkBlockDevice/nbd doc/proto.md. See docs/design/nbd.md.
package nbd

import (
	"errors"
	"syscall"

	"github.com/rebound-dr/rebound"
)

// Handshake and transmission magics.
const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic         = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic    = 0x0003e889045565a9
	requestMagic     = 0x25609513
	simpleReplyMagic = 0x67446698
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
)

// Option reply types.
const (
	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repFlagError  = 1 << 31
	repErrUnsup   = repFlagError | 1
	repErrPolicy  = repFlagError | 2
	repErrInvalid = repFlagError | 3
	repErrUnknown = repFlagError | 6
	repErrTooBig  = repFlagError | 9
)

// Info types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8
)

// Commands and command flags.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
)

// Errno values on the wire (Linux numbering, as the spec mandates).
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// Block size constraints we advertise. MaxPayload bounds the memory one
// request can pin.
const (
	minBlockSize       = 1
	preferredBlockSize = 4096
	MaxPayload         = 32 << 20
)

const requestSize = 28
const replySize = 16

// errnoOf maps a backend error to the errno sent to the client.
func errnoOf(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.ENOSPC):
		return errNoSpc
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS):
		return errPerm
	case errors.Is(err, syscall.EINVAL), rebound.ErrorCode(err) == rebound.EINVALID:
		return errInval
	case errors.Is(err, syscall.ENOMEM):
		return errNoMem
	case errors.Is(err, syscall.EOVERFLOW):
		return errOverflow
	case errors.Is(err, syscall.ENOTSUP):
		return errNotSup
	case errors.Is(err, syscall.ESHUTDOWN):
		return errShutdown
	}
	return errIO
}

// wireErrno turns a wire errno into a syscall.Errno (the spec numbers are
// Linux's, so this is the identity on Linux); unknown values become EINVAL
// as the spec asks.
func wireErrno(e uint32) syscall.Errno {
	switch e {
	case errPerm, errIO, errNoMem, errInval, errNoSpc, errOverflow, errNotSup, errShutdown:
		return syscall.Errno(e)
	}
	return syscall.EINVAL
}

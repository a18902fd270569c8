// Package pb holds the protobuf and gRPC code generated from
// proto/rebound/v1/rebound.proto. Regenerate with `go generate ./grpc/pb`
// (needs protoc, protoc-gen-go and protoc-gen-go-grpc on PATH).
package pb

//go:generate protoc -I ../../proto --go_out=. --go_opt=module=github.com/rebound-dr/rebound/grpc/pb --go-grpc_out=. --go-grpc_opt=module=github.com/rebound-dr/rebound/grpc/pb rebound/v1/rebound.proto

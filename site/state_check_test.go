package site

// Every site the tests open checks at Close that its state files hold
// each unit as it is (state.go).
func init() { checkState = true }

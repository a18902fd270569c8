package rebound

import (
	"encoding/json"
	"time"
)

// Duration is a time.Duration that reads and writes JSON as "5s".
type Duration time.Duration

func (d Duration) String() string { return time.Duration(d).String() }

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err2 := json.Unmarshal(b, &n); err2 != nil {
			return Errorf(EINVALID, "duration must be a string like \"5s\"")
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return Errorf(EINVALID, "invalid duration %q", s)
	}
	*d = Duration(v)
	return nil
}

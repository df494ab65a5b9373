"""One job's events to its watchers: the SSE stream (snapshot, replay, live tail, long poll),
the stream slots that cap them per tenant and key, and the async hub that serves many tails."""

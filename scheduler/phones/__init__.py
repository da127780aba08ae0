"""Phones, not processes (issue 14): the pure core of flock's virtual device clock.

Every module here is a plain function or class over plain values, with no gRPC, MPI or torch, so the
scheduler can call it and tests can drive it directly:

- `safe_pickle`: a restricted unpickler for FedScale's pickled traces;
- `files`: reading profile and trace files, and how a user finds its entry in them;
- `devices`: each user's device profile (built-in seeded distributions or a profile file);
- `availability`: when a user is on-line (always, per-round coin, daily curve, trace file);
- `selection`: on-line candidates drawn lazily, without a scan of the population;
- `clock`: a client's virtual duration (download + compute + upload + latencies);
- `sync_round`: which candidates of a synchronous round count, decided before anyone trains;
- `fedbuff`: the asynchronous (FedBuff / FedAsync) event schedule, checkpointable, and the buffers
  pending real results;
- `report`: the per-round / per-update records (sim_time, counts, staleness, bytes).
"""

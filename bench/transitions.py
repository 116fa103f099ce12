"""Transitions per second: the vectorised builder vs the RMTL reference code's per-step loop.

    python bench/transitions.py [--rows 2000000] [--ref-rows 30000]

A RetailRocket-scale SessionLog (~2 M rows, sessions of 2-8 events, 8 sparse fields
+ 1 dense) is made in memory. ``build_transitions`` turns the whole log into (state row,
action, reward [K], next row, done) in one call. The reference is a faithful
re-implementation of the public RMTL code's buffer warm-up (train/run.py + env.py +
agents/ReplayBuffer.py): reset() draws a random visitor, a Visitor replays the session
one step() at a time with ``action_space.sample()``, and every transition is copied
into a numpy ReplayBuffer with store(). That loop runs on a SUBSAMPLE (--ref-rows
transitions) and its rate is extrapolated to the full log (labelled as such).
Timings on a shared 2-core machine are noisy: best of --repeat runs is printed.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

from rmtl.agents.replay import RowReplay
from rmtl.envs import build_transitions
from rmtl.envs.synthetic_log import random_session_log


# ---------------------------------------------------------------- the reference loop (re-implemented)
class RefVisitor:
    """One session replayed step by step (reference env.py's Visitor, BCE reward)."""

    def __init__(self, session: dict):
        self.states, self.labels = session["states"], session["labels"]
        self.state = self.states[0]
        self.session_len = min(self.states.shape[0], self.labels.shape[0])
        self.timestep = 0

    def step(self, action):
        t = self.timestep
        label = self.labels[t]
        a = np.array([action[0], action[1]])
        reward = label * np.log(np.clip(a, 1e-4, 1)) + (1 - label) * np.log(np.clip(1 - a, 1e-4, 1))
        if t + 1 < self.session_len:
            nstate, done = self.states[t + 1], False
        else:
            nstate, done = self.states[t], True
        self.timestep += 1
        return nstate, reward, done, label


class RefReplayBuffer:
    """Preallocated numpy buffer filled one store() at a time (reference ReplayBuffer)."""

    def __init__(self, state_dim: int, action_dim: int, size: int):
        self.state_buf = np.zeros([size, state_dim], dtype=np.float32)
        self.action_buf = np.zeros([size, action_dim], dtype=np.float32)
        self.label_buf = np.zeros([size, action_dim], dtype=np.float32)
        self.nstate_buf = np.zeros([size, state_dim], dtype=np.float32)
        self.reward_buf = np.zeros([size, 2], dtype=np.float32)
        self.done_buf = np.zeros([size], dtype=np.float32)
        self.max_size, self.idx, self.size = size, 0, 0

    def store(self, state, action, nstate, reward, done, label):
        self.state_buf[self.idx] = state
        self.nstate_buf[self.idx] = nstate
        self.action_buf[self.idx] = action
        self.label_buf[self.idx] = label
        self.reward_buf[self.idx] = reward
        self.done_buf[self.idx] = done
        self.size = min(1 + self.size, self.max_size)
        self.idx = (1 + self.idx) % self.max_size


def reference_loop(log, max_rows: int, seed: int = 2022) -> tuple[int, float]:
    """(transitions collected, seconds) of the reference warm-up on the first sessions of the log."""
    ptr = log.session_ptr
    n_sessions = int(np.searchsorted(ptr, max_rows))
    states = np.c_[log.sparse, log.dense].astype(np.int64)
    # the reference builds these per-visitor dicts in getMDP() beforehand: not timed
    sessions = {i: {"states": states[ptr[i]:ptr[i + 1]], "labels": log.labels[ptr[i]:ptr[i + 1]]} for i in range(n_sessions)}
    visitors = list(sessions)
    np.random.seed(seed)
    action_space = gym.spaces.Box(0, 1, shape=(2,), dtype=np.float32)
    memory = RefReplayBuffer(states.shape[1], 2, int(ptr[n_sessions]))
    t0 = time.perf_counter()
    for _ in range(n_sessions):  # init_episode episodes
        visitor = RefVisitor(sessions[np.random.choice(visitors, size=1)[0]])
        state = visitor.state
        while True:
            action = action_space.sample()
            nstate, reward, done, label = visitor.step(action)
            memory.store(state=state.reshape(-1), action=action.reshape(-1), nstate=nstate.reshape(-1),
                         reward=reward, done=done, label=label)
            state = nstate
            if done:
                break
    return memory.size, time.perf_counter() - t0


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows of the synthetic log (default 2 M)")
    ap.add_argument("--ref-rows", type=int, default=30_000, help="transitions the reference loop collects")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    sessions = max(args.rows // 5, 1)  # mean session length 5
    log = random_session_log(sessions, min_length=2, max_length=8, cardinalities=(50_000, 200_000, 1000, 500, 100, 50, 10, 3),
                             num_dense=1, seed=0)
    print(f"log: {log.num_rows:,} rows, {log.num_sessions:,} sessions, {log.sparse.shape[1]} sparse + "
          f"{log.dense.shape[1]} dense fields (made in {time.perf_counter() - t0:.1f}s)")
    n = log.num_rows
    preds = np.random.default_rng(1).random(log.labels.shape, dtype=np.float32)

    t_random = best_of(lambda: build_transitions(log, policy="random", seed=0), args.repeat)
    t_noisy = best_of(lambda: build_transitions(log, preds, policy="noisy", noise_std=0.1, seed=0), args.repeat)
    print(f"build_transitions, uniform random actions : {n / t_random / 1e6:8.2f} M transitions/s ({t_random:.3f}s)")
    print(f"build_transitions, predictions + noise    : {n / t_noisy / 1e6:8.2f} M transitions/s ({t_noisy:.3f}s)")

    replay = RowReplay(log, build_transitions(log, seed=0))
    gen = torch.Generator().manual_seed(0)
    batches = 200
    t_sample = best_of(lambda: [replay.sample(1024, gen) for _ in range(batches)], args.repeat)
    print(f"RowReplay.sample (batch 1024, gathers features of s and s'): {batches * 1024 / t_sample / 1e6:.2f} M transitions/s")

    got, secs = reference_loop(log, args.ref_rows)
    rate = got / secs
    print(f"reference per-step loop on a {got:,}-transition SUBSAMPLE: {rate / 1e3:8.1f} k transitions/s "
          f"-> EXTRAPOLATED to {n:,} rows: {n / rate:.0f}s")
    print(f"speed-up of the vectorised builder (random actions): {n / t_random / rate:,.0f}x")
    print("(shared 2-core machine; timings are noisy)")


if __name__ == "__main__":
    main()

"""One tensor-parallel rank's process: a Worker over its shard, answering the engine core's calls.

Started by `MultiprocExecutor` as `python -m fastswitch.executor.rank`, it joins the process group,
loads its shard, says how many KV blocks fit, then runs each call in order: every rank runs every
step (the forward's all-reduces keep them in lockstep); rank 0's answer carries the sampled tokens,
every rank's the copies it saw done. It dies with its parent (the engine core, or `fastswitch ranks`
on another node: PR_SET_PDEATHSIG), exits when the engine core's end of its call socket goes away
(a rank on another node has no other way to know), and exits on the first error, after reporting it.
"""

import argparse
import logging
import signal
import time

import msgspec
import torch
import torch.distributed as dist
import zmq

from fastswitch.config import EngineConfig, parse_cores
from fastswitch.executor.worker import Worker
from fastswitch.lifetime import die_with_parent
from fastswitch.messages import ExecutorSpec, ModelOutput, SchedulerOutput
from fastswitch.model.parallel import Shard
from fastswitch.stats import EngineStats

log = logging.getLogger("fastswitch.rank")


class Call(msgspec.Struct, array_like=True):
    method: str  # "allocate_kv", "execute", "wait", "measure_copy_bandwidth", "close"
    step: SchedulerOutput | None = None
    value: int = 0  # allocate_kv: blocks; wait: the copy id


class Reply(msgspec.Struct, array_like=True, omit_defaults=True):
    rank: int
    error: str | None = None
    failed: bool = False  # wait: the copy failed on this rank
    output: ModelOutput | None = None
    spec: ExecutorSpec | None = None
    number: float | None = None  # the first reply: KV blocks that fit; execute: its seconds; measure_copy_bandwidth: bytes/s


def serve_rank(worker: Worker, rank: int, calls: zmq.Socket, replies: zmq.Socket) -> None:
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Call)
    replies.send(encoder.encode(Reply(rank, number=worker.kv_blocks_fit())))
    engine_gone = calls.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    poller = zmq.Poller()
    poller.register(calls, zmq.POLLIN)
    poller.register(engine_gone, zmq.POLLIN)
    while True:
        if calls not in dict(poller.poll()):
            log.error("rank %d: the engine core went away; exiting", rank)
            raise SystemExit(1)
        call = decoder.decode(calls.recv())
        reply = Reply(rank)
        if call.method == "execute":
            start = time.perf_counter()
            output = worker.execute(call.step)
            reply.output = output if rank == 0 else ModelOutput([], [], [], output.finished_copies,
                                                                output.failed_copies)
            reply.number = time.perf_counter() - start
        elif call.method == "allocate_kv":
            reply.spec = worker.allocate_kv(call.value)
        elif call.method == "wait":
            reply.failed = not worker.wait(call.value)
        elif call.method == "measure_copy_bandwidth":
            reply.number = worker.measure_copy_bandwidth()
        elif call.method == "close":
            worker.close()
            replies.send(encoder.encode(reply))
            return
        replies.send(encoder.encode(reply))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fastswitch.executor.rank")
    for name in ("rank", "size", "parent-pid"):
        parser.add_argument(f"--{name}", type=int, required=True)
    for name in ("init-method", "calls", "replies", "log-level"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--cores", default=None, help="CPU cores this rank runs on, e.g. 0-3")
    EngineConfig.add_cli_args(parser)
    args = parser.parse_args()
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the API server's to act on
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s rank {args.rank}: %(message)s")
    config = EngineConfig.from_cli_args(args)
    cores = parse_cores(args.cores) if args.cores else None
    context = zmq.Context()
    calls, replies = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    calls.connect(args.calls)
    replies.connect(args.replies)
    try:
        cuda = config.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(args.rank - config.local_ranks().start)  # NCCL binds to the current device
        dist.init_process_group("nccl" if cuda else "gloo", init_method=args.init_method, rank=args.rank,
                                world_size=args.size)
        serve_rank(Worker(config, EngineStats(), Shard(args.rank, args.size), cores), args.rank, calls, replies)
    except Exception as error:
        log.exception("rank %d failed", args.rank)
        replies.send(msgspec.msgpack.encode(Reply(args.rank, error=f"{type(error).__name__}: {error}")))
        raise SystemExit(1) from None
    finally:
        context.destroy(linger=2000)  # every socket (the monitor's too); a reply still queued gets 2 s to leave


if __name__ == "__main__":
    main()

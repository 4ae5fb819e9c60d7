"""One trainer per output folder: a second one is refused at once, naming the first; `kill -9` leaves no stale lock;
with several machines, the folder's lock is held once when they share it and once per machine when each has its
own."""

import json
import multiprocessing
import os
import signal
import socket
import time

from forked_trainer import TINY, ForkedTrainer

from backpack_train.run_folder import LOCK_FILE, RunLock, read_lock_record


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_trainer_is_refused_naming_the_first_and_kill_9_leaves_no_lock(tmp_path):
    trainer = ForkedTrainer(tmp_path)
    data_cache, output_dir = str(tmp_path / "data"), tmp_path / "run"
    argv = [*TINY, "--data_cache_dir", data_cache, "--output_dir", str(output_dir), "--eval_interval", "1000",
            "--max_steps", "1000", "--save_interval", "1000"]
    first, first_log = trainer.start(argv)
    try:  # the lock is taken before anything else, and the record says who holds it
        wait_for(lambda: read_lock_record(str(output_dir / LOCK_FILE)).get("pid") == first.pid
                 or not first.is_alive(), "the first trainer's lock")
        assert first.is_alive(), first_log.read_text()[-3000:]

        started = time.perf_counter()
        code, output = trainer([*argv, "--resume", "latest"])
        assert code == 1, output[-3000:]
        assert (f"error: {output_dir} is in use by another trainer (host {socket.gethostname()}, pid {first.pid}, "
                "since ") in output
        assert "data ready" not in output and "Traceback" not in output  # refused before anything else
        assert time.perf_counter() - started < 60
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.join()
    assert first.exitcode == -signal.SIGKILL

    lock = RunLock(str(output_dir))  # the kernel dropped the killed trainer's lock: nothing stale is left
    lock.acquire()
    record = json.loads((output_dir / LOCK_FILE).read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    lock.release()


def _machine(rank: int, port: int, folders: list[str], results) -> None:
    """One simulated machine (one process, process rank ``rank`` of 2): enter the run lock of its folder for each
    case, and report whether it holds the folder's lock itself."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    from accelerate import PartialState

    from backpack_train import run_folder

    state = PartialState(cpu=True)
    for case, folder in enumerate(folders):
        try:
            with run_folder.locked_output_dir(folder, state) as lock:
                results.put((case, rank, "holds" if lock.token is not None else "shares"))
                state.wait_for_everyone()  # both are inside before either leaves
        except run_folder.OutputDirError as error:
            results.put((case, rank, f"refused: {error}"))


def test_several_machines_lock_a_shared_folder_once_and_their_own_folders_each(tmp_path):
    shared, own = tmp_path / "shared", [tmp_path / "machine0", tmp_path / "machine1"]
    other = RunLock(str(tmp_path / "busy1"))  # machine 1's own folder, held by another trainer
    other.acquire()
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        # Case 0: one folder both see. Case 1: a folder per machine (the same path names a different folder on each
        # machine; here, a different path). Case 2: machine 1's own folder is in use.
        cases = [[str(shared), str(own[0]), str(tmp_path / "free0")], [str(shared), str(own[1]), other.output_dir]]
        machines = [context.Process(target=_machine, args=(rank, port, cases[rank], results)) for rank in (0, 1)]
        for machine in machines:
            machine.start()
        for machine in machines:
            machine.join(timeout=300)
        assert [machine.exitcode for machine in machines] == [0, 0]
        found = {}
        while not results.empty():
            case, rank, what = results.get()
            found[case, rank] = what
    finally:
        other.release()
    assert found[0, 0] == "holds" and found[0, 1] == "shares"  # shared: the main process alone
    assert found[1, 0] == "holds" and found[1, 1] == "holds"  # own folders: each machine's first process
    for rank in (0, 1):  # in use on one machine: every process stops, naming the holder
        assert found[2, rank].startswith(f"refused: {other.output_dir} is in use by another trainer (host "
                                         f"{socket.gethostname()}, pid {os.getpid()}"), found[2, rank]

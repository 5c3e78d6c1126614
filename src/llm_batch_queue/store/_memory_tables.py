"""MemoryStore's rows, indexed as they are written.

The store answers "this run's jobs", "this item's jobs", "how many jobs of each stage and status"
and "which jobs could be claimed" on every settlement and claim. Scanning every row for that made
a run of n items cost O(n²); these tables keep the answers current on each write instead (the way
a database keeps its indexes), so each write and each such lookup costs O(1) or the size of the
answer. Rows are only ever added or replaced, never removed.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from llm_batch_queue.jobs import Item, Job, JobStatus

_OPEN = (JobStatus.READY, JobStatus.RUNNING)


class JobTable(dict[str, Job]):
    """Jobs by id, plus: ids by run and by item (in creation order), counts per run of
    (stage, status), and the ids of open (READY or RUNNING) jobs."""

    def __init__(self) -> None:
        super().__init__()
        self.by_run: defaultdict[str, dict[str, None]] = defaultdict(dict)
        self.by_item: defaultdict[str, dict[str, None]] = defaultdict(dict)
        self.tally: defaultdict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
        self.open: dict[str, None] = {}

    def __setitem__(self, job_id: str, job: Job) -> None:
        old = self.get(job_id)
        if old is None:
            self.by_run[job.run_id][job_id] = None
            if job.item_id is not None:
                self.by_item[job.item_id][job_id] = None
        else:
            tally = self.tally[old.run_id]
            tally[(old.stage, old.status.value)] -= 1
            if not tally[(old.stage, old.status.value)]:
                del tally[(old.stage, old.status.value)]
        self.tally[job.run_id][(job.stage, job.status.value)] += 1
        if job.status in _OPEN:
            self.open[job_id] = None
        else:
            self.open.pop(job_id, None)
        super().__setitem__(job_id, job)

    def of_run(self, run_id: str) -> list[Job]:
        return [self[i] for i in self.by_run.get(run_id, ())]

    def of_item(self, item_id: str) -> list[Job]:
        return [self[i] for i in self.by_item.get(item_id, ())]

    def open_jobs(self) -> list[Job]:
        return [self[i] for i in self.open]


class ItemTable(dict[str, Item]):
    """Items by id, plus: ids by run (in creation order) and counts per run of status."""

    def __init__(self) -> None:
        super().__init__()
        self.by_run: defaultdict[str, dict[str, None]] = defaultdict(dict)
        self.tally: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def __setitem__(self, item_id: str, item: Item) -> None:
        old = self.get(item_id)
        if old is None:
            self.by_run[item.run_id][item_id] = None
        else:
            tally = self.tally[old.run_id]
            tally[old.status.value] -= 1
            if not tally[old.status.value]:
                del tally[old.status.value]
        self.tally[item.run_id][item.status.value] += 1
        super().__setitem__(item_id, item)

    def of_run(self, run_id: str) -> list[Item]:
        return [self[i] for i in self.by_run.get(run_id, ())]

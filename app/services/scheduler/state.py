"""The scheduler's state machine, pure: every replica applies the same commands to the same state.

A command it refuses returns its error as the result and changes nothing (everything is checked
before anything changes); a leader's command from a past term is refused (StaleTerm).
"""

from __future__ import annotations

from app.services.scheduler import checks
from app.services.scheduler.errors import (
    AlreadyExists,
    BadSchedulerRequest,
    NoSuchCluster,
    NoSuchDataNode,
    NoSuchProcedure,
    NoSuchTable,
    Refused,
    SchedulerError,
    ShardBusy,
    StaleTerm,
    StepNotReady,
)
from app.services.scheduler.messages import (
    Advance,
    Cancel,
    ClusterSpec,
    Command,
    CreateCluster,
    CreateTable,
    DropCluster,
    DropTable,
    Expire,
    LeaderElected,
    NodeStateName,
    Operator,
    Place,
    Propose,
    RecordLoad,
    RegisterNode,
    Report,
    SetNodeState,
    UpdateCluster,
)
from app.services.scheduler.model import Cluster, Event, HistoryEntry, NodeRecord, Procedure, Replica, Shard, Step
from app.services.scheduler.procedures import PRIORITY, check_limits, plan, roll_back, start_step, step_complete

KEEP_FINISHED = 1000  # finished procedures kept for their history (the oldest go first)
KEEP_ELECTIONS = 100  # scheduling leader elections kept (term, node, time)
HOT_FACTOR = 2.0  # a shard with this many times its cluster's mean load is hot


def key_bounds(count: int, index: int) -> tuple[str, str]:
    """The index-th of `count` equal ranges of the 32-bit key space, as 8 hex digits ("" at the ends)."""
    space = 1 << 32
    start = "" if index == 0 else f"{space * index // count:08x}"
    end = "" if index == count - 1 else f"{space * (index + 1) // count:08x}"
    return start, end


class SchedulerState:
    """Clusters, their nodes and shards, and every procedure; the leader's term; a revision per applied command."""

    def __init__(self) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.procedures: dict[int, Procedure] = {}
        self.busy: dict[tuple[str, int], int] = {}  # (cluster, shard) -> the procedure holding it
        self.finished: list[int] = []  # finished procedure ids, oldest first
        self.next_proc = 1
        self.term = 0
        self.leader = ""
        self.revision = 0
        self.elections: list[tuple[int, str, int]] = []  # (term, node, time_ms), the newest KEEP_ELECTIONS

    # ---- reads ----------------------------------------------------------------------------------

    def cluster(self, name: str) -> Cluster:
        """A cluster, or NoSuchCluster."""
        c = self.clusters.get(name)
        if c is None:
            raise NoSuchCluster(f"no cluster named {name!r}")
        return c

    def running(self, cluster: str | None = None) -> list[Procedure]:
        """Procedures not finished, oldest first (of one cluster, or all)."""
        return [p for p in self.procedures.values() if not p.finished and (cluster is None or p.cluster == cluster)]

    def procedure(self, proc_id: int) -> Procedure:
        """A procedure, or NoSuchProcedure."""
        p = self.procedures.get(proc_id)
        if p is None:
            raise NoSuchProcedure(f"no procedure {proc_id}")
        return p

    def assignment(self, cluster: str, node: str) -> tuple[list[tuple[Shard, Replica]], list[int]]:
        """What a node must hold (each shard with its replica there) and what it must drop."""
        c = self.cluster(cluster)
        held = [(s, r) for s in c.shards.values() for r in s.replicas if r.node == node]
        return held, sorted(set(c.stale.get(node, ())))

    # ---- apply ----------------------------------------------------------------------------------

    def apply(self, cmd: Command) -> tuple[object, list[Event]]:
        """Apply one command: on success the revision grows by one; a refused command changes nothing."""
        events: list[Event] = []
        rev = self.revision + 1
        try:
            result = self._dispatch(cmd, events)
        except SchedulerError as err:
            return err, []
        except Exception as exc:  # the same on every replica: the command's error, the log goes on
            return SchedulerError(f"{type(cmd).__name__} could not be applied: {exc!r}"), []
        self.revision = rev
        return result, [Event(e.cluster, e.kind, e.nodes, e.proc, e.text, rev) for e in events]

    def _term(self, term: int) -> None:
        if term != self.term:
            raise StaleTerm(f"term {term} is not the scheduling leader's term {self.term}")

    def _dispatch(self, cmd: Command, events: list[Event]) -> object:
        match cmd:
            case LeaderElected():
                if cmd.term <= self.term:
                    raise StaleTerm(f"term {cmd.term} is not newer than {self.term}")
                self.term, self.leader = cmd.term, cmd.node_id
                self.elections = [*self.elections[-(KEEP_ELECTIONS - 1) :], (cmd.term, cmd.node_id, cmd.time_ms)]
                return cmd.term
            case CreateCluster():
                return self._create_cluster(cmd.spec, cmd.time_ms, events)
            case UpdateCluster():
                return self._update_cluster(cmd, events)
            case DropCluster():
                c = self.cluster(cmd.name)
                for p in self.running(cmd.name):
                    self._finish(p, "canceled", "the cluster was dropped", cmd.time_ms)
                del self.clusters[cmd.name]
                events.append(Event(cmd.name, "cluster", tuple(c.nodes), text="dropped"))
                return cmd.name
            case RegisterNode():
                return self._register(cmd, events)
            case SetNodeState():
                return self._node_state(cmd, events)
            case Place():
                self._term(cmd.term)
                return self._place(cmd, events)
            case Propose():
                return self._propose(cmd, events)
            case Advance():
                self._term(cmd.term)
                return self._advance(cmd, events)
            case Expire():
                self._term(cmd.term)
                return self._expire(cmd, events)
            case Cancel():
                p = self.procedure(cmd.proc)
                if p.finished:
                    raise Refused(f"procedure {p.id} already ended: {p.status}")
                changed = self._finish(p, "canceled", cmd.reason, cmd.time_ms, cmd.trace_id)
                events.append(Event(p.cluster, "procedure", tuple(sorted(changed)), p.id, "canceled"))
                return p.id
            case Report():
                return self._report(cmd, events)
            case RecordLoad():
                self._term(cmd.term)
                return self._record_load(cmd)
            case CreateTable():
                return self._create_table(cmd, events)
            case DropTable():
                c = self.cluster(cmd.cluster)
                sid = c.tables.pop(cmd.table, None)
                if sid is None:
                    raise NoSuchTable(f"cluster {cmd.cluster} has no table {cmd.table!r}")
                shard = c.shards[sid]
                shard.tables.remove(cmd.table)
                events.append(Event(cmd.cluster, "table", tuple(r.node for r in shard.replicas), text=cmd.table))
                return sid
        raise BadSchedulerRequest(f"unknown command {type(cmd).__name__}")

    # ---- clusters and nodes -----------------------------------------------------------------------

    def _create_cluster(self, spec: ClusterSpec, now_ms: int, events: list[Event]) -> str:
        checks.cluster_spec(spec)
        if spec.name in self.clusters:
            raise AlreadyExists(f"a cluster named {spec.name!r} exists")
        c = Cluster(spec, created_ms=now_ms, limits=spec.limits, max_down_time_s=spec.max_down_time_s)
        c.enable_schedule = spec.enable_schedule
        for i in range(spec.shard_count):
            if spec.split_keys:
                bounds = ("", *spec.split_keys, "")
                start, end = bounds[i], bounds[i + 1]
            else:
                start, end = key_bounds(spec.shard_count, i)
            c.shards[i] = Shard(i, start, end, group=i % spec.groups if spec.groups else 0)
        c.next_shard = spec.shard_count
        self.clusters[spec.name] = c
        events.append(Event(spec.name, "cluster", text="created"))
        return spec.name

    def _update_cluster(self, cmd: UpdateCluster, events: list[Event]) -> str:
        c = self.cluster(cmd.name)
        u = checks.cluster_update(cmd.update)
        for sid in u.affinity or {}:
            if int(sid) not in c.shards:
                raise BadSchedulerRequest(f"affinity names shard {sid}, which cluster {cmd.name} does not have")
        if u.enable_schedule is not None:
            c.enable_schedule = u.enable_schedule
        if u.paused is not None:
            c.paused = u.paused
        if u.frozen is not None:
            c.frozen = u.frozen
        if u.max_down_time_s is not None:
            c.max_down_time_s = u.max_down_time_s
        if u.limits is not None:
            c.limits = u.limits
        if u.affinity is not None:
            c.affinity = dict(u.affinity)
        events.append(Event(cmd.name, "cluster", text="updated"))
        return cmd.name

    def _register(self, cmd: RegisterNode, events: list[Event]) -> str:
        c = self.cluster(cmd.cluster)
        spec = checks.node_spec(cmd.node)
        rec = c.nodes.get(spec.name)
        if rec is None:
            if c.spec.topology == "static" and len(c.nodes) >= c.spec.node_count:
                raise Refused(
                    f"cluster {cmd.cluster} has a static topology of {c.spec.node_count} nodes: it does not grow"
                )
            c.nodes[spec.name] = NodeRecord(spec, "online", cmd.time_ms, cmd.time_ms)
        else:
            rec.spec = spec
            if rec.state in ("suspect", "down", "removed"):
                back: NodeStateName = "draining" if rec.draining and rec.state != "removed" else "online"
                rec.state, rec.since_ms, rec.down_ms, rec.reason = back, cmd.time_ms, 0, "registered again"
        events.append(Event(cmd.cluster, "node", (spec.name,), text="registered"))
        return spec.name

    def _node_state(self, cmd: SetNodeState, events: list[Event]) -> str:
        c = self.cluster(cmd.cluster)
        rec = c.nodes.get(cmd.node)
        if rec is None:
            raise NoSuchDataNode(f"cluster {cmd.cluster} has no node {cmd.node!r}")
        if cmd.term:
            self._term(cmd.term)
            if cmd.state not in ("online", "suspect", "down"):
                raise BadSchedulerRequest(f"the leader judges online, suspect or down, not {cmd.state}")
            if rec.state in ("draining", "removed") and cmd.state != "down":
                raise Refused(f"node {cmd.node} is {rec.state}: an operator put it there")
            if rec.state == "removed":
                raise Refused(f"node {cmd.node} is removed")
        elif cmd.state == "draining":
            if rec.state == "removed":
                raise Refused(f"node {cmd.node} is removed")
        elif cmd.state == "online":
            if not rec.draining:
                raise Refused(f"node {cmd.node} is {rec.state}: only a draining node is put back online by hand")
        elif cmd.state != "removed":
            raise BadSchedulerRequest(f"an operator sets draining, online (undrain) or removed, not {cmd.state}")
        state = cmd.state
        if not cmd.term:  # an operator's drain outlives a down spell; undrain ends it
            rec.draining = cmd.state == "draining"
            if cmd.state == "online" and rec.state in ("suspect", "down"):
                state = rec.state  # undrained while away: the leader's judgement stands
        elif cmd.state == "online" and rec.draining:
            state = "draining"  # back from a down spell, still drained
        if rec.state == state:
            return state
        if state == "down":
            rec.down_ms = cmd.time_ms
        elif state in ("online", "draining"):
            rec.down_ms = 0
        rec.state, rec.since_ms, rec.reason = state, cmd.time_ms, cmd.reason
        if state == "removed":
            c.stale.pop(cmd.node, None)
        events.append(Event(cmd.cluster, "node", (cmd.node,), text=state))
        return state

    def _place(self, cmd: Place, events: list[Event]) -> int:
        c = self.cluster(cmd.cluster)
        if c.placed:
            raise Refused(f"cluster {cmd.cluster} is placed already")
        if len(cmd.nodes) != len(c.shards):
            raise BadSchedulerRequest(f"placement names {len(cmd.nodes)} shards, the cluster has {len(c.shards)}")
        if c.spec.topology == "static" and len(c.nodes) < c.spec.node_count:
            raise Refused(f"static cluster {cmd.cluster} waits for {c.spec.node_count} nodes, has {len(c.nodes)}")
        for nodes in cmd.nodes:
            if not 1 <= len(nodes) <= c.spec.max_replicas or len(set(nodes)) != len(nodes):
                raise BadSchedulerRequest(f"each shard needs 1..{c.spec.max_replicas} distinct nodes")
            for n in nodes:
                if c.nodes.get(n) is None or c.nodes[n].state != "online":
                    raise Refused(f"node {n} is not online")
        for shard, nodes in zip(sorted(c.shards), cmd.nodes, strict=True):
            s = c.shards[shard]
            s.replicas = [Replica(n, "leader" if i == 0 else "follower") for i, n in enumerate(nodes)]
            s.epoch += 1
        c.placed = True
        # HoraeMeta's create-cluster procedure: it ends once every node opened what it was given. It
        # holds no shard (the schedulers may act at once, a failover first of all).
        step = Step("place", -1, epoch=1, started_ms=cmd.time_ms)
        step.deadline_ms = cmd.time_ms + int(c.limits.step_timeout_s * 1000)
        op = Operator("create_cluster", (), "placement")
        proc = Procedure(self.next_proc, cmd.cluster, op, [step], 0, "started", created_ms=cmd.time_ms)
        proc.updated_ms, proc.term, proc.trace_id = cmd.time_ms, cmd.term, cmd.trace_id
        proc.history = [
            HistoryEntry(cmd.time_ms, "created by placement", cmd.trace_id),
            HistoryEntry(cmd.time_ms, f"step 0 place {len(cmd.nodes)} shards @1", cmd.trace_id),
        ]
        self.next_proc += 1
        self.procedures[proc.id] = proc
        nodes = tuple(sorted({n for ns in cmd.nodes for n in ns}))
        events.append(Event(cmd.cluster, "shards", nodes, proc.id, text="placed"))
        return len(cmd.nodes)

    def _report(self, cmd: Report, events: list[Event]) -> int:
        c = self.cluster(cmd.cluster)
        if cmd.node not in c.nodes:
            raise NoSuchDataNode(f"cluster {cmd.cluster} has no node {cmd.node!r}")
        shard = c.shards.get(cmd.shard)
        if cmd.status == "closed":
            held = c.stale.get(cmd.node, [])
            if cmd.shard in held:
                held.remove(cmd.shard)
                if not held:
                    del c.stale[cmd.node]
                events.append(Event(cmd.cluster, "shards", (cmd.node,), text=f"closed {cmd.shard}"))
            return cmd.shard
        rep = shard.replica(cmd.node) if shard is not None else None
        if shard is None or rep is None:
            raise Refused(f"node {cmd.node} holds no replica of shard {cmd.shard}: drop it")
        if cmd.epoch > shard.epoch:
            raise BadSchedulerRequest(f"shard {cmd.shard} is at epoch {shard.epoch}, not {cmd.epoch}")
        if cmd.epoch > rep.acked:
            rep.acked = cmd.epoch
            busy = self.busy.get((cmd.cluster, cmd.shard))
            events.append(Event(cmd.cluster, "shards", (), busy or 0, f"opened {cmd.shard}@{cmd.epoch}"))
        return rep.acked

    def _record_load(self, cmd: RecordLoad) -> int:
        c = self.cluster(cmd.cluster)
        c.sizes = {s: max(0, v) for s, v in cmd.sizes.items() if s in c.shards}
        c.load = {s: max(0.0, v) for s, v in cmd.load.items() if s in c.shards}
        mean = sum(c.load.values()) / max(1, len(c.shards))
        c.hot_rounds = {s: c.hot_rounds.get(s, 0) + 1 for s, v in c.load.items() if mean > 0 and v >= HOT_FACTOR * mean}
        return len(c.hot_rounds)

    def _create_table(self, cmd: CreateTable, events: list[Event]) -> int:
        c = self.cluster(cmd.cluster)
        checks.name(cmd.table, "table")
        if cmd.table in c.tables:
            raise AlreadyExists(f"table {cmd.table!r} is on shard {c.tables[cmd.table]}")
        shard = min(c.shards.values(), key=lambda s: (len(s.tables), s.id))
        shard.tables.append(cmd.table)
        c.tables[cmd.table] = shard.id
        events.append(Event(cmd.cluster, "table", tuple(r.node for r in shard.replicas), text=cmd.table))
        return shard.id

    # ---- procedures -------------------------------------------------------------------------------

    def _propose(self, cmd: Propose, events: list[Event]) -> int:
        if cmd.term:
            self._term(cmd.term)
        c = self.cluster(cmd.cluster)
        op = cmd.op
        if not c.placed:
            raise Refused(f"cluster {cmd.cluster} is not placed yet: it waits for its nodes")
        if op.source not in ("manual", "split", "merge"):  # a store's split or merge is asked like a manual one
            if not cmd.term:
                raise BadSchedulerRequest(f"only the scheduling leader proposes as {op.source}")
            if not c.enable_schedule:
                raise Refused(f"scheduling is off in cluster {cmd.cluster}")
            if c.paused and op.source not in ("failover", "repair"):
                raise Refused(f"scheduling is paused in cluster {cmd.cluster}")
        if c.frozen and op.source != "failover":
            raise Refused(f"cluster {cmd.cluster} is frozen (deploy mode): its topology does not change")
        steps = plan(c, op)
        ids = {s.shard for s in steps} | set(op.shards)
        replaced: list[Procedure] = []
        for sid in sorted(ids):
            holder = self.busy.get((cmd.cluster, sid))
            if holder is None:
                continue
            other = self.procedures[holder]
            if PRIORITY[op.source] <= PRIORITY[other.op.source]:
                raise ShardBusy(f"shard {sid} is held by procedure {holder} ({other.op.kind}, {other.status})")
            replaced.append(other)
        running = [p for p in self.running(cmd.cluster) if p not in replaced]
        check_limits(c, running, op, cmd.time_ms)
        changed: set[str] = set()
        for other in replaced:
            why = f"replaced by a {op.source} procedure"
            changed |= self._finish(other, "replaced", why, cmd.time_ms, cmd.trace_id)
        proc = Procedure(self.next_proc, cmd.cluster, op, steps, created_ms=cmd.time_ms, updated_ms=cmd.time_ms)
        proc.term, proc.trace_id = cmd.term, cmd.trace_id
        proc.epochs = {sid: c.shards[sid].epoch for sid in ids}
        proc.history.append(HistoryEntry(cmd.time_ms, f"created by {op.source}", cmd.trace_id))
        self.next_proc += 1
        self.procedures[proc.id] = proc
        for sid in ids:
            self.busy[(cmd.cluster, sid)] = proc.id
        if (cmd.term and not c.frozen) or op.source == "failover":
            proc.at = 0
            changed |= self._try_start(c, proc, cmd.time_ms, cmd.trace_id)
        events.append(Event(cmd.cluster, "procedure", tuple(sorted(changed)), proc.id, proc.status))
        return proc.id

    def _stale_epoch(self, c: Cluster, proc: Procedure) -> str:
        for sid, epoch in proc.epochs.items():
            shard = c.shards.get(sid)
            if shard is None or shard.epoch != epoch:
                now = shard.epoch if shard is not None else "gone"
                return f"stale epoch: shard {sid} is at {now}, the procedure expected {epoch}"
        return ""

    def _try_start(self, c: Cluster, proc: Procedure, now_ms: int, trace_id: str = "") -> set[str]:
        """Start the current step; on a step that can no longer run the procedure is canceled."""
        step = proc.steps[proc.at]
        try:
            changed = start_step(c, proc, now_ms)
        except StepNotReady as err:
            proc.reason = err.message
            return set()
        except SchedulerError as err:
            return self._finish(proc, "canceled", err.message, now_ms, trace_id)
        for sid in proc.epochs:  # a split's new shard is held too
            self.busy.setdefault((proc.cluster, sid), proc.id)
        proc.status, proc.reason, proc.updated_ms = "started", "", now_ms
        proc.history.append(HistoryEntry(now_ms, f"step {proc.at} {step.action} {step.node} @{step.epoch}", trace_id))
        return changed

    def _advance(self, cmd: Advance, events: list[Event]) -> str:
        proc = self.procedure(cmd.proc)
        if proc.finished:
            raise Refused(f"procedure {proc.id} already ended: {proc.status}")
        c = self.cluster(proc.cluster)
        if c.frozen and proc.op.source != "failover":
            raise Refused(f"cluster {proc.cluster} is frozen (deploy mode)")
        # at -1 starts a procedure (a retry of it is not the first step's completion)
        if cmd.at != proc.at and not (cmd.at == -1 and proc.at == 0 and not proc.steps[0].started):
            raise StepNotReady(f"procedure {proc.id} is at step {proc.at}, not {cmd.at}")
        proc.at = max(proc.at, 0)
        if stale := self._stale_epoch(c, proc):
            changed = self._finish(proc, "canceled", stale, cmd.time_ms, cmd.trace_id)
            events.append(Event(proc.cluster, "procedure", tuple(sorted(changed)), proc.id, "canceled"))
            return proc.status
        step = proc.steps[proc.at]
        changed = set()
        if step.started:
            if not step_complete(c, step):
                raise StepNotReady(f"step {proc.at} ({step.action}) of procedure {proc.id} is not acknowledged")
            step.done_ms = cmd.time_ms
            proc.history.append(HistoryEntry(cmd.time_ms, f"step {proc.at} {step.action} done", cmd.trace_id))
            if proc.at + 1 == len(proc.steps):
                changed = self._finish(proc, "success", "", cmd.time_ms, cmd.trace_id)
                events.append(Event(proc.cluster, "procedure", (), proc.id, "success"))
                return proc.status
            proc.at += 1
        changed = self._try_start(c, proc, cmd.time_ms, cmd.trace_id)
        events.append(Event(proc.cluster, "procedure", tuple(sorted(changed)), proc.id, proc.status))
        return proc.status

    def _expire(self, cmd: Expire, events: list[Event]) -> str:
        proc = self.procedure(cmd.proc)
        if proc.finished or cmd.at != proc.at:
            raise Refused(f"procedure {proc.id} is {proc.status} at step {proc.at}")
        c = self.cluster(proc.cluster)
        expire_ms = int(c.limits.expire_s * 1000)
        if proc.at < 0 or proc.status == "created":
            if cmd.time_ms - proc.created_ms < expire_ms:
                raise StepNotReady(f"procedure {proc.id} was created {cmd.time_ms - proc.created_ms} ms ago")
            status, why = "expired", "not started in time"
        else:
            step = proc.steps[proc.at]
            if step.started:
                if cmd.time_ms < step.deadline_ms or step_complete(c, step):
                    raise StepNotReady(f"step {proc.at} of procedure {proc.id} is within its deadline")
                status, why = "timeout", f"step {proc.at} ({step.action} {step.node}) was not acknowledged in time"
            else:
                waited_from = proc.steps[proc.at - 1].done_ms if proc.at else proc.created_ms
                if cmd.time_ms - waited_from < expire_ms:
                    raise StepNotReady(f"step {proc.at} of procedure {proc.id} waits within its time")
                status, why = "timeout", f"step {proc.at} could not start: {proc.reason}"
        changed = self._finish(proc, status, why, cmd.time_ms, cmd.trace_id)
        events.append(Event(proc.cluster, "procedure", tuple(sorted(changed)), proc.id, status))
        return status

    def _finish(self, proc: Procedure, status: str, reason: str, now_ms: int, trace_id: str = "") -> set[str]:
        c = self.clusters.get(proc.cluster)
        changed = roll_back(c, proc, now_ms) if c is not None and status != "success" else set()
        proc.status = status  # type: ignore[assignment]  # one of model.Status, checked by the callers
        proc.reason, proc.updated_ms = reason, now_ms
        proc.history.append(HistoryEntry(now_ms, f"{status}{': ' + reason if reason else ''}", trace_id))
        for sid in {*proc.epochs, *proc.op.shards}:
            if self.busy.get((proc.cluster, sid)) == proc.id:
                del self.busy[(proc.cluster, sid)]
        self.finished.append(proc.id)
        while len(self.finished) > KEEP_FINISHED:
            self.procedures.pop(self.finished.pop(0), None)
        return changed

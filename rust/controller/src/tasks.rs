//! The load-balanced task scheduler: dependencies (`after`, `follow`), target restrictions,
//! timeouts, retries, blacklists after unmet functional dependencies, and aborts.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;

use foldhash::{HashMap, HashSet, HashSetExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fp_io::OutFrame;
use fp_wire::{Envelope, Field, Value};

use crate::engines::InFlight;
use crate::log::{log_at, Level};
use crate::messages::{hub_error_content, reply_type, str_field};
use crate::server::{frames_of, ident, show, Env, Server, CTL_E, STEAL_IDENT, TASK_C, TASK_E};

/// Most unassignable queued tasks looked at in one pass of the queue.
const SCAN_LIMIT: usize = 1024;

/// How many finished msg_ids are remembered for dependencies.
const OUTCOME_MEMORY: usize = 1 << 18;

/// A dependency on other msg_ids (the wire form is a list, or a dict with flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Dep {
    pub ids: Vec<String>,
    pub all: bool,
    pub success: bool,
    pub failure: bool,
}

impl Dep {
    /// Parse metadata `after`/`follow`: `None` when absent or empty.
    pub fn parse(v: Option<&Value>) -> Result<Option<Dep>, String> {
        let (ids_v, all, success, failure) = match v {
            None | Some(Value::Nil) => return Ok(None),
            Some(Value::Array(items)) => (items.as_slice(), true, true, false),
            Some(m @ Value::Map(_)) => {
                let flag = |k: &str, d: bool| match m.get(k) {
                    Some(Value::Bool(b)) => *b,
                    _ => d,
                };
                let ids = match m.get("dependencies") {
                    Some(Value::Array(items)) => items.as_slice(),
                    None | Some(Value::Nil) => &[],
                    Some(other) => {
                        return Err(format!("dependencies must be a list, not {other:?}"))
                    }
                };
                (
                    ids,
                    flag("all", true),
                    flag("success", true),
                    flag("failure", false),
                )
            }
            Some(other) => {
                return Err(format!(
                    "a dependency must be a list or a dict, not {other:?}"
                ))
            }
        };
        if !success && !failure {
            return Err("a dependency needs success or failure (or both) to be true".into());
        }
        let mut ids = Vec::with_capacity(ids_v.len());
        for id in ids_v {
            match id {
                Value::Str(s) => ids.push(s.clone()),
                other => return Err(format!("dependency msg_ids must be strings, not {other:?}")),
            }
        }
        if ids.is_empty() {
            return Ok(None);
        }
        Ok(Some(Dep {
            ids,
            all,
            success,
            failure,
        }))
    }

    fn counts(&self, o: &Outcomes, id: &str) -> Option<bool> {
        // Some(true): finished in a way that counts; Some(false): finished but does not count.
        match o.outcome.get(id) {
            Some((true, _)) => Some(self.success),
            Some((false, _)) => Some(self.failure),
            None => None,
        }
    }

    pub fn met(&self, o: &Outcomes) -> bool {
        let mut it = self.ids.iter().map(|id| self.counts(o, id) == Some(true));
        if self.all {
            it.all(|x| x)
        } else {
            it.any(|x| x)
        }
    }

    pub fn unreachable(&self, o: &Outcomes) -> bool {
        let mut it = self.ids.iter().map(|id| self.counts(o, id) == Some(false));
        if self.all {
            it.any(|x| x)
        } else {
            it.all(|x| x)
        }
    }
}

/// Finished msg_ids: success or failure, and the engine they ran on (one map: one lookup
/// per finished task).
#[derive(Debug, Default)]
pub struct Outcomes {
    outcome: HashMap<String, (bool, Option<Vec<u8>>)>,
    order: VecDeque<String>,
}

impl Outcomes {
    pub fn record(&mut self, msg_id: String, success: bool, engine: Option<Vec<u8>>) {
        match self.outcome.entry(msg_id) {
            Entry::Occupied(mut known) => {
                let (ok, place) = known.get_mut();
                *ok = success;
                if engine.is_some() {
                    *place = engine; // (an outcome without an engine keeps the earlier one)
                }
            }
            Entry::Vacant(new) => {
                self.order.push_back(new.key().clone());
                new.insert((success, engine));
            }
        }
        while self.order.len() > OUTCOME_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.outcome.remove(&old);
            }
        }
    }

    pub fn knows(&self, msg_id: &str) -> bool {
        self.outcome.contains_key(msg_id)
    }

    /// The engine `msg_id` ran on, if it finished on one.
    pub fn location(&self, msg_id: &str) -> Option<&Vec<u8>> {
        self.outcome.get(msg_id).and_then(|(_, e)| e.as_ref())
    }
}

/// One load-balanced task held by the scheduler.
pub struct Task {
    pub client: Vec<u8>,
    pub msg_id: String,
    pub msg_type: String,
    /// (its header is `env.header`, unpacked only when the scheduler answers it itself:
    /// [`Server::task_header`])
    pub env: Env,
    pub targets: Option<Vec<Vec<u8>>>,
    pub after: Option<Dep>,
    pub follow: Option<Dep>,
    pub deadline: Option<Instant>,
    pub retries: i64,
    pub blacklist: HashSet<Vec<u8>>,
    /// What the last engine that did not meet the task's dependencies said (its `evalue`):
    /// named when no engine is left.
    pub last_unmet: Option<String>,
    /// Order of assignment to an engine (the newest queued task is the one to steal).
    pub seq: u64,
}

#[derive(Default)]
pub struct TaskState {
    /// Ready to run (after-dependencies met), in submission order.
    pub queue: VecDeque<Task>,
    /// Waiting for after-dependencies.
    pub waiting: Vec<Task>,
    /// Running on an engine: msg_id -> (engine uuid, task with shared copies of its frames).
    pub running: HashMap<String, (Vec<u8>, Task)>,
    pub outcomes: Outcomes,
    /// Aborts of msg_ids not seen yet (the abort overtook its task): aborted on arrival.
    pub early_aborts: HashSet<String>,
    /// Tasks being taken back from a busy engine's queue (see [`Server::steal_for`]).
    pub stealing: HashSet<String>,
    next_seq: u64,
    with_deadline: usize,
}

impl TaskState {
    pub fn unassigned(&self) -> usize {
        self.queue.len() + self.waiting.len()
    }

    fn known(&self, msg_id: &str) -> bool {
        self.outcomes.knows(msg_id)
            || self.running.contains_key(msg_id)
            || self.queue.iter().any(|t| t.msg_id == msg_id)
            || self.waiting.iter().any(|t| t.msg_id == msg_id)
    }
}

/// Every frame of an envelope shared (bodies are reference counted, not copied).
fn share_env(env: &Env) -> Env {
    Envelope {
        idents: env.idents.iter().map(|f| f.share()).collect(),
        signature: env.signature.share(),
        header: env.header.share(),
        parent_header: env.parent_header.share(),
        metadata: env.metadata.share(),
        content: env.content.share(),
        buffers: env.buffers.iter().map(|f| f.share()).collect(),
    }
}

/// A positive number of seconds; `None` for anything else, including values too large for a
/// `Duration` (a client's `timeout=1e300` must not bring the controller down).
fn seconds(v: Option<&Value>) -> Option<Duration> {
    let s = v.and_then(Value::as_f64)?;
    if !(s.is_finite() && s > 0.0) {
        return None;
    }
    Duration::try_from_secs_f64(s).ok()
}

impl Server {
    /// The header of a task's request, unpacked (it was checked when the task arrived).
    fn task_header(&self, task: &Task) -> Value {
        self.session
            .packer
            .unpack(task.env.header.as_ref(), "header")
            .unwrap_or_else(|_| Value::empty_map())
    }

    pub(crate) fn on_task_submit(&mut self, env: Env) {
        let Some(client) = env.idents.first().map(|f| f.as_ref().to_vec()) else {
            return;
        };
        // the header fields the scheduler and the records use, read in place
        let Some([msg_id, msg_type, session, date]) =
            self.fields(&env, "header", ["msg_id", "msg_type", "session", "date"])
        else {
            return;
        };
        let (Some(msg_id), Some(msg_type)) = (
            msg_id.as_ref().and_then(Field::as_str),
            msg_type.as_ref().and_then(Field::as_str),
        ) else {
            self.header_lacks_ids();
            return;
        };
        if !self.is_request(msg_type, "task") {
            return;
        }
        let (msg_id, msg_type) = (msg_id.to_owned(), msg_type.to_owned());
        let submitted = date
            .as_ref()
            .and_then(Field::as_str)
            .and_then(crate::records::date::parse);
        let session = session.as_ref().and_then(Field::as_str).map(str::to_owned);
        // the scheduling fields only, read in place (no allocation for the rest of the dict)
        let Some(fields) = self.fields(
            &env,
            "metadata",
            ["targets", "after", "follow", "timeout", "retries"],
        ) else {
            return;
        };
        let [targets, after, follow, timeout, retries] = fields.map(|f| f.map(Field::into_value));
        if !self.check_part(&env, "parent_header") || !self.check_part(&env, "content") {
            return; // an engine would drop it unanswered, and its slot would stay taken
        }
        let aborted_early =
            !self.tasks.early_aborts.is_empty() && self.tasks.early_aborts.remove(&msg_id);
        let captured = self.records.capture(&env);
        self.records
            .on_request_parts("task", &msg_id, submitted, session, captured, None);
        self.stats.tasks_queued.fetch_add(1, Ordering::Relaxed);
        let targets = match targets {
            Some(Value::Array(items)) if !items.is_empty() => Some(
                items
                    .iter()
                    .filter_map(|t| match t {
                        Value::Str(s) => Some(s.as_bytes().to_vec()),
                        other => other
                            .as_i64()
                            .and_then(|id| self.engines.uuid_of(id).cloned()),
                    })
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        };
        let parsed =
            Dep::parse(after.as_ref()).and_then(|a| Dep::parse(follow.as_ref()).map(|f| (a, f)));
        let mut task = Task {
            client,
            msg_id,
            msg_type,
            env,
            targets,
            after: None,
            follow: None,
            // A deadline past what an Instant can hold is no deadline.
            deadline: seconds(timeout.as_ref()).and_then(|d| Instant::now().checked_add(d)),
            retries: retries.as_ref().and_then(Value::as_i64).unwrap_or(0).max(0),
            blacklist: HashSet::new(),
            last_unmet: None,
            seq: 0,
        };
        if aborted_early {
            if task.deadline.is_some() {
                self.tasks.with_deadline += 1;
            }
            return self.answer_aborted(task);
        }
        let (after, follow) = match parsed {
            Ok(p) => p,
            Err(e) => return self.fail_task(task, "InvalidDependency", &e),
        };
        for dep in after.iter().chain(follow.iter()) {
            for id in &dep.ids {
                if *id == task.msg_id {
                    return self.fail_task(
                        task,
                        "InvalidDependency",
                        "a task cannot depend on itself",
                    );
                }
                if !self.tasks.known(id) {
                    let why = format!("unknown dependency msg_id {id:?}");
                    return self.fail_task(task, "InvalidDependency", &why);
                }
            }
        }
        task.after = after;
        task.follow = follow;
        if task.deadline.is_some() {
            self.tasks.with_deadline += 1;
        }
        if let Some(why) = self.impossible(&task) {
            return self.fail_task(task, "ImpossibleDependency", &why);
        }
        let ready = task
            .after
            .as_ref()
            .is_none_or(|d| d.met(&self.tasks.outcomes));
        if ready {
            self.tasks.queue.push_back(task);
            self.drain_queue();
        } else {
            self.tasks.waiting.push(task);
        }
    }

    /// Why a task can never run, if it cannot.
    fn impossible(&self, task: &Task) -> Option<String> {
        let o = &self.tasks.outcomes;
        if task.after.as_ref().is_some_and(|d| d.unreachable(o)) {
            return Some("the 'after' dependencies can no longer be met".into());
        }
        if let Some(f) = &task.follow {
            if f.unreachable(o) {
                return Some("the 'follow' dependencies can no longer be met".into());
            }
            let places: HashSet<&Vec<u8>> = f.ids.iter().filter_map(|id| o.location(id)).collect();
            if f.all && places.len() > 1 {
                return Some("'follow' names tasks that ran on different engines".into());
            }
            if f.all && f.met(o) {
                if let Some(place) = places.iter().next() {
                    if !self
                        .engines
                        .by_uuid
                        .get(*place)
                        .is_some_and(|e| e.registered)
                    {
                        return Some("the engine the task must follow is gone".into());
                    }
                }
            }
        }
        if let Some(targets) = &task.targets {
            let alive = targets.iter().any(|t| {
                !task.blacklist.contains(t)
                    && self.engines.by_uuid.get(t).is_some_and(|e| e.registered)
            });
            if !alive {
                let why = "none of the task's target engines can run it";
                return Some(match &task.last_unmet {
                    Some(last) => format!("{why} (the last one to try: {last})"),
                    None => why.into(),
                });
            }
        } else if !task.blacklist.is_empty() && task.deadline.is_none() {
            // (with a timeout, it waits for an engine that can run it until then, as in
            // ipyparallel)
            let registered: Vec<&Vec<u8>> = self
                .engines
                .by_uuid
                .values()
                .filter(|e| e.registered)
                .map(|e| &e.uuid)
                .collect();
            if !registered.is_empty() && registered.iter().all(|u| task.blacklist.contains(*u)) {
                let why = "every engine failed to meet the task's dependencies";
                return Some(match &task.last_unmet {
                    Some(last) => format!("{why} (the last one: {last})"),
                    None => why.into(),
                });
            }
        }
        None
    }

    /// Engines where a follow dependency allows the task to run (None: anywhere).
    fn follow_places(&self, task: &Task) -> Option<HashSet<Vec<u8>>> {
        let f = task.follow.as_ref()?;
        let o = &self.tasks.outcomes;
        let places: HashSet<Vec<u8>> = f
            .ids
            .iter()
            .filter(|id| f.counts(o, id) == Some(true))
            .filter_map(|id| o.location(id).cloned())
            .collect();
        Some(places)
    }

    /// Send a task to an engine if one can take it; gives the task back otherwise.
    fn try_assign(&mut self, task: Task) -> Option<Task> {
        if let Some(f) = &task.follow {
            if !f.met(&self.tasks.outcomes) {
                return Some(task);
            }
        }
        let places = self.follow_places(&task);
        if task.follow.as_ref().is_some_and(|f| f.all)
            && places.as_ref().is_some_and(|p| p.len() > 1)
        {
            return Some(task); // no engine ran them all: `impossible` says so
        }
        let registered = &self.engines.by_uuid;
        let allowed = |u: &[u8]| {
            registered.get(u).is_some_and(|e| e.registered)
                && !task.blacklist.contains(u)
                && task
                    .targets
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|x| x == u))
                && places.as_ref().is_none_or(|p| p.contains(u))
        };
        let Some(uuid) = self.balancer.pick(&allowed) else {
            return Some(task);
        };
        let mut env = share_env(&task.env);
        let rest: Vec<_> = env.idents.drain(1..).collect();
        let mut idents = vec![ident(&uuid), ident(&task.client)];
        idents.extend(rest.into_iter().map(OutFrame::Received));
        env.idents.clear();
        match self.send(TASK_E, frames_of(idents, env)) {
            Ok(()) => {
                let mut task = task;
                self.tasks.next_seq += 1;
                task.seq = self.tasks.next_seq;
                self.stats.tasks_assigned.fetch_add(1, Ordering::Relaxed);
                self.records.on_assign(&task.msg_id, &uuid);
                if task.deadline.is_some() {
                    self.tasks.with_deadline = self.tasks.with_deadline.saturating_sub(1);
                }
                if let Some(e) = self.engines.by_uuid.get_mut(&uuid) {
                    e.tasks.insert(task.msg_id.clone());
                }
                self.tasks.running.insert(task.msg_id.clone(), (uuid, task));
                None
            }
            Err(_) => {
                // The engine vanished between registration and now: try elsewhere later.
                self.balancer.unpick(&uuid);
                let mut task = task;
                task.blacklist.insert(uuid);
                Some(task)
            }
        }
    }

    /// Assign queued tasks while engines have room. Costs O(tasks assigned + tasks skipped):
    /// tasks that cannot run yet (targets or follow restrictions) are put back in front, in
    /// order, and at most `SCAN_LIMIT` of them are looked at per call.
    pub(crate) fn drain_queue(&mut self) {
        let mut skipped: Vec<Task> = Vec::new();
        while skipped.len() < SCAN_LIMIT && self.balancer.has_capacity() {
            let Some(task) = self.tasks.queue.pop_front() else {
                break;
            };
            if let Some(back) = self.try_assign(task) {
                match self.impossible(&back) {
                    Some(why) => self.fail_task(back, "ImpossibleDependency", &why),
                    None => skipped.push(back),
                }
            }
        }
        for task in skipped.into_iter().rev() {
            self.tasks.queue.push_front(task);
        }
    }

    /// Answer a task with a scheduler error (no engine ran it).
    fn fail_task(&mut self, task: Task, ename: &str, evalue: &str) {
        log_at!(
            Level::Info,
            "task {} failed in the scheduler: {ename}: {evalue}",
            task.msg_id
        );
        if task.deadline.is_some() && !self.tasks.running.contains_key(&task.msg_id) {
            self.tasks.with_deadline = self.tasks.with_deadline.saturating_sub(1);
        }
        self.tasks.outcomes.record(task.msg_id.clone(), false, None);
        // as ipyparallel's scheduler: a wrapped exception (engine_info empty: no engine ran
        // it) and empty metadata (no engine)
        let (content, md) = (hub_error_content(ename, evalue), Value::empty_map());
        let rtype = reply_type(&task.msg_type);
        let header = self.task_header(&task);
        let msg_id = task.msg_id;
        let idents = vec![task.client];
        self.answer_made_up(
            Some(TASK_C),
            idents,
            &msg_id,
            None,
            &rtype,
            content,
            header,
            md,
        );
        self.release_waiting();
    }

    /// Move waiting tasks whose after-dependencies are now met to the queue; fail the
    /// ones that became impossible.
    pub(crate) fn release_waiting(&mut self) {
        if self.tasks.waiting.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.tasks.waiting);
        let mut moved = false;
        for task in waiting {
            if let Some(why) = self.impossible(&task) {
                self.fail_task(task, "ImpossibleDependency", &why);
            } else if task
                .after
                .as_ref()
                .is_none_or(|d| d.met(&self.tasks.outcomes))
            {
                self.tasks.queue.push_back(task);
                moved = true;
            } else {
                self.tasks.waiting.push(task);
            }
        }
        if moved {
            self.drain_queue();
        }
    }

    pub(crate) fn on_task_reply(&mut self, env: Env) {
        if env.idents.len() < 2 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            log_at!(Level::Warning, "dropped a task reply too short to route");
            return;
        }
        let engine = env.idents[0].as_ref().to_vec();
        let client = env.idents[1].as_ref().to_vec();
        // (read in place: unpacking a reply's metadata, a dozen strings, cost more than the
        // rest of relaying it)
        let msg_id = match self.fields(&env, "parent_header", ["msg_id"]) {
            Some([id]) => id.as_ref().and_then(Field::as_str).map(str::to_owned),
            None => None,
        };
        let [status, met] = self
            .fields(&env, "metadata", ["status", "dependencies_met"])
            .unwrap_or_default();
        let status = status.as_ref().and_then(Field::as_str);
        let ok = status == Some("ok");
        let aborted = status == Some("aborted");
        let unmet = met.as_ref().and_then(Field::as_bool) == Some(false);
        if let Some(msg_id) = &msg_id {
            if !self.tasks.stealing.is_empty()
                && self.tasks.stealing.remove(msg_id)
                && aborted
                && self.took_back(msg_id, &engine)
            {
                return;
            }
            if let Some(e) = self.engines.by_uuid.get_mut(&engine) {
                if let Some(key) = e.tasks.take(msg_id) {
                    e.completed.push(key);
                    self.balancer.finished(&engine);
                }
            }
            if let Some((_, mut task)) = self.tasks.running.remove(msg_id) {
                // as ipyparallel: a failed task with retries left goes back to the queue,
                // blacklisted on this engine, when another engine may run it, or when it
                // has targets (none left: ImpossibleDependency) or a timeout (it waits for an
                // engine until then: TaskTimeout); otherwise its error is relayed now
                // (ipyparallel would keep it waiting for an engine that may never come)
                let retry = !ok
                    && !unmet
                    && task.retries > 0
                    && (self.another_engine(&task, &engine)
                        || task.targets.is_some()
                        || task.deadline.is_some());
                if retry {
                    if let Some(reason) = self.failure_reason(&env) {
                        task.last_unmet = Some(reason);
                    }
                }
                if unmet || retry {
                    if !unmet {
                        task.retries -= 1;
                    }
                    log_at!(
                        Level::Debug,
                        "task {msg_id} rescheduled after {} on {}",
                        if unmet {
                            "an unmet dependency"
                        } else {
                            "a failure"
                        },
                        show(&engine)
                    );
                    if unmet {
                        // (an engine that gives no reason keeps an earlier one's)
                        if let Some(reason) = self.unmet_reason(&env) {
                            task.last_unmet = Some(reason);
                        }
                    }
                    task.blacklist.insert(engine);
                    if task.deadline.is_some() {
                        self.tasks.with_deadline += 1;
                    }
                    self.tasks.queue.push_front(task);
                    self.drain_queue();
                    return;
                }
            }
            self.tasks
                .outcomes
                .record(msg_id.clone(), ok, Some(engine.clone()));
            self.records.on_reply(msg_id, &engine, &env);
        }
        let mut env = env;
        let rest: Vec<_> = env.idents.drain(2..).collect();
        let mut idents = vec![ident(&client), ident(&engine)];
        idents.extend(rest.into_iter().map(OutFrame::Received));
        env.idents.clear();
        let _ = self.send(TASK_C, frames_of(idents, env));
        self.release_waiting();
        if !self.tasks.queue.is_empty() {
            self.drain_queue();
        }
        if self.tasks.queue.is_empty() {
            self.steal_for(&engine);
        }
    }

    /// "failed with <ename>: <evalue>" of a failure reply (for a later ImpossibleDependency).
    fn failure_reason(&mut self, env: &Env) -> Option<String> {
        let content = self.unpack(env, "content")?;
        let ename = str_field(&content, "ename").unwrap_or("an error");
        let evalue = self.unmet_reason(env).unwrap_or_default();
        Some(format!("failed with {ename}: {evalue}"))
    }

    /// The `evalue` of an engine's UnmetDependency reply, shortened (it is repeated in the
    /// scheduler's error when no engine is left).
    fn unmet_reason(&mut self, env: &Env) -> Option<String> {
        const MAX_CHARS: usize = 500;
        let content = self.unpack(env, "content")?;
        let evalue = str_field(&content, "evalue")?.trim();
        if evalue.is_empty() {
            return None;
        }
        let mut short: String = evalue.chars().take(MAX_CHARS).collect();
        if short.len() < evalue.len() {
            short.push('…');
        }
        Some(short)
    }

    /// **Work stealing.** `idle` just answered and nothing waits in the scheduler: if another
    /// engine holds a task it has not started, behind one that has been running longer than
    /// the queue budget (a long task, which the adaptive depth could not know of when it
    /// queued short ones behind it), ask that engine to give its newest such task back (an
    /// `abort_request` from the scheduler). Its "aborted" reply puts the task back in the
    /// queue ([`took_back`](Self::took_back)); had it started meanwhile, its result comes as
    /// usual. Only with the adaptive depth: an explicit `--hwm` is a strict placement.
    fn steal_for(&mut self, idle: &[u8]) {
        if self.balancer.budget.is_zero() || self.balancer.load_of(idle) != Some(0) {
            return;
        }
        let Some(victim) = self.balancer.stuck(idle) else {
            return;
        };
        let registered = self.engines.by_uuid.get(idle).is_some_and(|e| e.registered);
        let runnable_on_idle = |t: &Task| {
            registered
                && t.follow.is_none()
                // taking it back blacklists the victim (a replay there would be dropped):
                // a task with retries left would lose that engine for its retries, and with a
                // timeout it would wait for one until then, its own error hidden
                && t.retries == 0
                && !t.blacklist.contains(idle)
                && t.targets
                    .as_ref()
                    .is_none_or(|ts| ts.iter().any(|x| x.as_slice() == idle))
        };
        let mine: Vec<(&String, &Task)> = self
            .tasks
            .running
            .iter()
            .filter(|(_, (e, _))| *e == victim)
            .map(|(m, (_, t))| (m, t))
            .collect();
        let Some(oldest) = mine.iter().map(|(_, t)| t.seq).min() else {
            return;
        };
        let Some(msg_id) = mine
            .iter()
            .filter(|(m, t)| {
                t.seq != oldest && runnable_on_idle(t) && !self.tasks.stealing.contains(*m)
            })
            .max_by_key(|(_, t)| t.seq)
            .map(|(m, _)| (*m).clone())
        else {
            return;
        };
        log_at!(
            Level::Debug,
            "taking task {msg_id} back from busy engine {} for idle engine {}",
            show(&victim),
            show(idle)
        );
        self.tasks.stealing.insert(msg_id.clone());
        let content = Value::map([("msg_ids", Value::Array(vec![Value::Str(msg_id)]))]);
        self.send_new(
            CTL_E,
            vec![victim, STEAL_IDENT.to_vec()],
            "abort_request",
            content,
            Value::empty_map(),
            Value::empty_map(),
        );
    }

    /// A user's `abort_request` to engines: its tasks are no longer taken back (their
    /// "aborted" answers go to the user); an empty list aborts everything queued.
    pub(crate) fn user_aborts(&mut self, env: &Env) {
        let ids = self
            .unpack(env, "content")
            .and_then(|c| c.get("msg_ids").cloned());
        match ids {
            Some(Value::Array(items)) if !items.is_empty() => {
                for v in items {
                    if let Some(m) = v.as_str() {
                        self.tasks.stealing.remove(m);
                    }
                }
            }
            _ => self.tasks.stealing.clear(),
        }
    }

    /// A task taken back from `engine` (it answered "aborted" to the scheduler's request):
    /// back to the front of the queue, as if never assigned. False if it is no longer ours.
    fn took_back(&mut self, msg_id: &str, engine: &[u8]) -> bool {
        let Some((_, mut task)) = self.tasks.running.remove(msg_id) else {
            return false;
        };
        if let Some(e) = self.engines.by_uuid.get_mut(engine) {
            e.tasks.remove(msg_id);
        }
        self.balancer.unpick(engine);
        task.seq = 0;
        // not back to that engine: it would see the very same signed message again and drop
        // it as a replay
        task.blacklist.insert(engine.to_vec());
        if task.deadline.is_some() {
            self.tasks.with_deadline += 1;
        }
        self.tasks.queue.push_front(task);
        self.drain_queue();
        true
    }

    /// Tasks that were running on an engine that died: retried elsewhere if they have retries
    /// left, answered with EngineError otherwise.
    pub(crate) fn tasks_stranded(&mut self, uuid: &[u8], id: i64) {
        let stranded: Vec<String> = self
            .tasks
            .running
            .iter()
            .filter(|(_, (e, _))| e.as_slice() == uuid)
            .map(|(m, _)| m.clone())
            .collect();
        for msg_id in stranded {
            let Some((_, mut task)) = self.tasks.running.remove(&msg_id) else {
                continue;
            };
            self.tasks.stealing.remove(&msg_id); // (no answer will come from that engine)
            if task.retries > 0 {
                task.retries -= 1;
                task.blacklist.insert(uuid.to_vec());
                if task.deadline.is_some() {
                    self.tasks.with_deadline += 1; // (its timeout counts again in the queue)
                }
                self.tasks.queue.push_front(task);
            } else {
                self.tasks
                    .outcomes
                    .record(msg_id.clone(), false, Some(uuid.to_vec()));
                let req = InFlight {
                    header: self.task_header(&task),
                    client: task.client,
                    msg_type: task.msg_type,
                };
                self.fail_request(Some(TASK_C), uuid, id, &msg_id, req);
            }
        }
        self.release_waiting();
        self.drain_queue();
    }

    /// Whether an engine other than `failed` (and not blacklisted) could still run the task.
    fn another_engine(&self, task: &Task, failed: &[u8]) -> bool {
        self.engines.by_uuid.values().any(|e| {
            e.registered
                && e.uuid.as_slice() != failed
                && !task.blacklist.contains(&e.uuid)
                && task.targets.as_ref().is_none_or(|t| t.contains(&e.uuid))
        })
    }

    /// Fail queued tasks whose timeout passed before they started.
    pub(crate) fn task_timeouts(&mut self) {
        if self.tasks.with_deadline == 0 {
            return;
        }
        let now = Instant::now();
        let expired = |t: &Task| t.deadline.is_some_and(|d| now >= d);
        let mut timed_out = Vec::new();
        let queue = std::mem::take(&mut self.tasks.queue);
        for t in queue {
            if expired(&t) {
                timed_out.push(t);
            } else {
                self.tasks.queue.push_back(t);
            }
        }
        let waiting = std::mem::take(&mut self.tasks.waiting);
        for t in waiting {
            if expired(&t) {
                timed_out.push(t);
            } else {
                self.tasks.waiting.push(t);
            }
        }
        for t in timed_out {
            let why = match &t.last_unmet {
                // (a failed, retried task: its last failure is not lost)
                Some(last) => format!("the task did not start before its timeout (last: {last})"),
                None => "the task did not start before its timeout".to_owned(),
            };
            self.fail_task(t, "TaskTimeout", &why);
        }
    }

    /// Answer a task that never ran with an aborted reply.
    fn answer_aborted(&mut self, t: Task) {
        if t.deadline.is_some() {
            self.tasks.with_deadline = self.tasks.with_deadline.saturating_sub(1);
        }
        self.tasks.outcomes.record(t.msg_id.clone(), false, None);
        let md = Value::map([("status", Value::from("aborted"))]);
        let aborted = Value::map([("status", Value::from("aborted"))]);
        let rtype = reply_type(&t.msg_type);
        let header = self.task_header(&t);
        let idents = vec![t.client];
        self.answer_made_up(
            Some(TASK_C),
            idents,
            &t.msg_id,
            None,
            &rtype,
            aborted,
            header,
            md,
        );
    }

    /// Remove queued (not yet running) tasks; they are answered as aborted. Returns their ids.
    pub(crate) fn abort_queued(&mut self, msg_ids: &HashSet<String>) -> Vec<String> {
        let mut aborted = Vec::new();
        let mut keep_q = VecDeque::new();
        for t in std::mem::take(&mut self.tasks.queue) {
            if msg_ids.contains(&t.msg_id) {
                aborted.push(t);
            } else {
                keep_q.push_back(t);
            }
        }
        self.tasks.queue = keep_q;
        let mut keep_w = Vec::new();
        for t in std::mem::take(&mut self.tasks.waiting) {
            if msg_ids.contains(&t.msg_id) {
                aborted.push(t);
            } else {
                keep_w.push(t);
            }
        }
        self.tasks.waiting = keep_w;
        let mut ids = Vec::new();
        for t in aborted {
            ids.push(t.msg_id.clone());
            self.answer_aborted(t);
        }
        // An abort may overtake its task (they travel on different sockets): remember the ids
        // not seen yet, and abort those tasks when they arrive.
        for id in msg_ids {
            if !ids.contains(id) && !self.tasks.known(id) && self.tasks.early_aborts.len() < 100_000
            {
                self.tasks.early_aborts.insert(id.clone());
            }
        }
        self.release_waiting();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::from(*s)).collect())
    }

    #[test]
    fn parse_forms_and_errors() {
        assert_eq!(Dep::parse(None), Ok(None));
        assert_eq!(Dep::parse(Some(&ids(&[]))), Ok(None));
        let d = Dep::parse(Some(&ids(&["a"]))).unwrap().unwrap();
        assert!(d.all && d.success && !d.failure);
        let m = Value::map([
            ("dependencies", ids(&["a", "b"])),
            ("all", Value::Bool(false)),
            ("success", Value::Bool(false)),
            ("failure", Value::Bool(true)),
        ]);
        let d = Dep::parse(Some(&m)).unwrap().unwrap();
        assert!(!d.all && !d.success && d.failure);
        let bad = Value::map([
            ("dependencies", ids(&["a"])),
            ("success", Value::Bool(false)),
            ("failure", Value::Bool(false)),
        ]);
        assert!(Dep::parse(Some(&bad)).is_err());
        assert!(Dep::parse(Some(&Value::Int(3))).is_err());
    }

    #[test]
    fn met_and_unreachable() {
        let mut o = Outcomes::default();
        let all = Dep {
            ids: vec!["a".into(), "b".into()],
            all: true,
            success: true,
            failure: false,
        };
        let any = Dep {
            all: false,
            ..all.clone()
        };
        assert!(!all.met(&o) && !any.met(&o));
        o.record("a".into(), true, None);
        assert!(!all.met(&o) && any.met(&o));
        o.record("b".into(), false, None);
        assert!(!all.met(&o) && all.unreachable(&o));
        assert!(any.met(&o) && !any.unreachable(&o));
        let on_failure = Dep {
            success: false,
            failure: true,
            ..all.clone()
        };
        assert!(on_failure.unreachable(&o));
    }
}

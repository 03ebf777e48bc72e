//! Feeds a controller its triggers at most [`Pacer::new`]'s `ahead` objects ahead of its
//! reconciles.
//!
//! kube-runtime's scheduler takes every trigger as it comes and keeps one entry, several
//! hundred bytes, per object it was given; its queue and table keep their capacity for good.
//! Fed every ApiClient after a start, a relist or an hourly resync, at 10,000 ApiClients it
//! held 10,000 entries, about 7 MB. Paced, it holds what the controller can start soon:
//! - a trigger for one object is drained from its source at once, so no watch is held back,
//!   and kept once (by namespace and name) until it is handed on;
//! - a trigger for every object is kept as one mark, and the cache is replayed from a list of
//!   its entries when the controller has room;
//! - a trigger for an object that already waits in the scheduler is dropped: the scheduler
//!   would have merged it into the waiting one. An object stops waiting when its reconcile
//!   starts, so a change during a reconcile triggers another, as without pacing.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use kube::runtime::controller;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;

/// What a controller is asked to reconcile.
pub enum Trigger<K: Resource> {
    One(ObjectRef<K>),
    /// Every object of the cache.
    All,
}

/// The objects handed to one controller whose reconcile has not started yet.
pub struct Pacer<K: Resource> {
    ahead: usize,
    waiting: Mutex<HashSet<ObjectRef<K>>>,
    started: Notify,
}

impl<K> Pacer<K>
where
    K: Resource + Clone + 'static + Send + Sync,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    /// A pacer letting at most `ahead` objects wait in the controller's scheduler.
    pub fn new(ahead: usize) -> Arc<Self> {
        Arc::new(Self {
            ahead: ahead.max(1),
            waiting: Mutex::default(),
            started: Notify::new(),
        })
    }

    fn waiting(&self) -> MutexGuard<'_, HashSet<ObjectRef<K>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reconcile of `object` starts: it no longer waits.
    pub fn started(&self, object: &ObjectRef<K>) {
        if self.waiting().remove(object) {
            self.started.notify_waiters();
        }
    }

    /// Tells the pacer what became of a reconcile request: the controller drops a request
    /// whose object was deleted before its turn, without a reconcile.
    pub fn settled<T, E1, E2>(&self, result: &Result<T, controller::Error<E1, E2>>) {
        if let Err(controller::Error::ObjectNotFound(object)) = result {
            let mut object_ref = ObjectRef::<K>::new(&object.name);
            object_ref.namespace.clone_from(&object.namespace);
            self.started(&object_ref);
        }
    }

    /// The objects `triggers` ask for (those of `store` for [`Trigger::All`]), handed on
    /// while fewer than `ahead` wait.
    pub fn pace(
        self: Arc<Self>,
        triggers: impl Stream<Item = Trigger<K>> + Send + 'static,
        store: Store<K>,
    ) -> impl Stream<Item = ObjectRef<K>> + Send + 'static {
        let queue = Queue {
            one: VecDeque::new(),
            queued: HashSet::new(),
            all: false,
            replay: Vec::new(),
            store,
        };
        futures::stream::unfold(
            (triggers.boxed(), queue, self),
            |(mut triggers, mut queue, pacer)| async move {
                let object = loop {
                    let started = pacer.started.notified();
                    tokio::pin!(started);
                    started.as_mut().enable();
                    if pacer.waiting().len() < pacer.ahead {
                        match queue.next() {
                            Some(object) if pacer.waiting().insert(object.clone()) => break object,
                            // Waits already: the scheduler would merge it.
                            Some(_) => {}
                            None => queue.push(triggers.next().await?, &pacer.waiting()),
                        }
                        continue;
                    }
                    tokio::select! {
                        trigger = triggers.next() => queue.push(trigger?, &pacer.waiting()),
                        () = &mut started => {}
                    }
                };
                Some((object, (triggers, queue, pacer)))
            },
        )
    }
}

/// The triggers not handed on yet.
struct Queue<K: Resource + 'static>
where
    K::DynamicType: Hash + Eq,
{
    /// Objects triggered one by one, oldest first, each once (`queued`).
    one: VecDeque<ObjectRef<K>>,
    queued: HashSet<ObjectRef<K>>,
    /// Every object of `store` is to be handed on.
    all: bool,
    /// What is left of the replay of `store` under way.
    replay: Vec<Arc<K>>,
    store: Store<K>,
}

impl<K> Queue<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    /// Queues `trigger`, unless it is for an object that is queued or `waiting` already.
    fn push(&mut self, trigger: Trigger<K>, waiting: &HashSet<ObjectRef<K>>) {
        match trigger {
            Trigger::One(object) => {
                if !waiting.contains(&object) && self.queued.insert(object.clone()) {
                    self.one.push_back(object);
                }
            }
            Trigger::All => {
                // The replay covers every object queued so far (one that is not cached has
                // nothing to reconcile); it starts over from the cache as it is now.
                self.one.clear();
                self.queued = HashSet::new();
                self.replay = Vec::new();
                self.all = true;
            }
        }
    }

    /// The next object to hand on: single triggers first, then the replay.
    fn next(&mut self) -> Option<ObjectRef<K>> {
        if let Some(object) = self.one.pop_front() {
            self.queued.remove(&object);
            return Some(object);
        }
        if std::mem::take(&mut self.all) {
            self.replay = self.store.state();
        }
        self.replay.pop().map(|object| object_ref(&*object))
    }
}

/// A reference to `object` by namespace and name only: what the scheduler keeps of a
/// waiting reconcile, without the resource version and uid [`ObjectRef::from_obj`] copies.
pub fn object_ref<K>(object: &K) -> ObjectRef<K>
where
    K: Resource,
    K::DynamicType: Default,
{
    let object_ref = ObjectRef::new(&object.name_any());
    match object.meta().namespace.as_deref() {
        Some(namespace) => object_ref.within(namespace),
        None => object_ref,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn object(name: &str) -> ObjectRef<ConfigMap> {
        ObjectRef::new(name).within("ns")
    }

    fn one(name: &str) -> Trigger<ConfigMap> {
        Trigger::One(object(name))
    }

    /// A store holding ConfigMaps `names`.
    fn store(names: &[&str]) -> Store<ConfigMap> {
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&Event::Init);
        for name in names {
            writer.apply_watcher_event(&Event::InitApply(ConfigMap {
                metadata: ObjectMeta {
                    name: Some((*name).to_owned()),
                    namespace: Some("ns".to_owned()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            }));
        }
        writer.apply_watcher_event(&Event::InitDone);
        reader
    }

    /// What `paced` hands on now, without waiting.
    fn ready(paced: &mut (impl Stream<Item = ObjectRef<ConfigMap>> + Unpin)) -> Vec<String> {
        std::iter::from_fn(|| paced.next().now_or_never().flatten())
            .map(|o| o.name)
            .collect()
    }

    #[tokio::test]
    async fn hands_on_at_most_ahead_then_one_per_started_reconcile() {
        let pacer = Pacer::new(2);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut paced = pacer.clone().pace(rx, store(&[])).boxed();
        for name in ["a", "b", "c", "d"] {
            tx.unbounded_send(one(name)).unwrap();
        }
        assert_eq!(ready(&mut paced), ["a", "b"]);
        // A reconcile of an object that does not wait changes nothing.
        pacer.started(&object("z"));
        assert!(ready(&mut paced).is_empty());
        pacer.started(&object("a"));
        assert_eq!(ready(&mut paced), ["c"]);
        // Triggers are taken from their source while the controller has no room.
        for name in ["e", "f"] {
            tx.unbounded_send(one(name)).unwrap();
        }
        assert!(ready(&mut paced).is_empty());
        assert!(tx.is_empty(), "the source is drained");
        pacer.started(&object("b"));
        pacer.started(&object("c"));
        assert_eq!(ready(&mut paced), ["d", "e"]);
    }

    #[tokio::test]
    async fn a_trigger_for_a_queued_or_waiting_object_is_merged_not_one_that_started() {
        let pacer = Pacer::new(1);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut paced = pacer.clone().pace(rx, store(&[])).boxed();
        for name in ["a", "b", "b", "a"] {
            tx.unbounded_send(one(name)).unwrap();
        }
        assert_eq!(ready(&mut paced), ["a"]);
        pacer.started(&object("a"));
        assert_eq!(ready(&mut paced), ["b"], "b queued once");
        pacer.started(&object("b"));
        assert!(ready(&mut paced).is_empty(), "a's second trigger merged");
        tx.unbounded_send(one("a")).unwrap();
        assert_eq!(
            ready(&mut paced),
            ["a"],
            "a change during a's reconcile triggers another"
        );
    }

    #[tokio::test]
    async fn all_replays_the_store_after_single_triggers_that_came_later() {
        let pacer = Pacer::new(1);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut paced = pacer.clone().pace(rx, store(&["x", "y"])).boxed();
        tx.unbounded_send(one("a")).unwrap();
        assert_eq!(ready(&mut paced), ["a"]);
        for trigger in [one("gone"), Trigger::All, one("late")] {
            tx.unbounded_send(trigger).unwrap();
        }
        assert!(ready(&mut paced).is_empty());
        pacer.started(&object("a"));
        let mut handed = Vec::new();
        loop {
            let now = ready(&mut paced);
            let [name] = now.as_slice() else {
                assert!(now.is_empty(), "one at a time: {now:?}");
                break;
            };
            pacer.started(&object(name));
            handed.push(name.clone());
        }
        assert_eq!(handed.remove(0), "late", "single triggers first");
        handed.sort();
        assert_eq!(
            handed,
            ["x", "y"],
            "the replay covers what was queued before it"
        );
        drop(tx);
        assert_eq!(paced.next().await, None);
    }

    #[tokio::test]
    async fn a_request_dropped_for_a_deleted_object_frees_its_place() {
        let pacer = Pacer::new(1);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut paced = pacer.clone().pace(rx, store(&[])).boxed();
        tx.unbounded_send(one("a")).unwrap();
        tx.unbounded_send(one("b")).unwrap();
        assert_eq!(ready(&mut paced), ["a"]);
        let dropped: Result<(), controller::Error<std::io::Error, std::io::Error>> = Err(
            controller::Error::ObjectNotFound(Box::new(object("a").erase())),
        );
        pacer.settled(&dropped);
        assert_eq!(ready(&mut paced), ["b"]);
    }
}

//! The metadata store's contract (`store.rs`), one suite run against both
//! stores: SQLite, and Redis (a real `redis-server`).

mod common;

use common::Backend;
use modelgate_batch::store::{BatchRecord, Deletion, FileQuery, FileRecord, Lease, Meta, Order, Progress};
use modelgate_proto::batch::{Batch, BatchStatus, FileObject};
use modelgate_proto::clock;
use modelgate_proto::stored_response::StoredResponse;
use serde_json::json;
use std::time::Duration;

const ALICE: &str = "alice";
const BOB: &str = "bob";
const HOLDER: &str = "replica-a";
/// Short enough to wait out in a test; long enough not to expire mid-call.
const TTL: Duration = Duration::from_millis(300);

/// Ids sort as they were made: `n` stands for the time.
fn file_id(n: u64) -> String {
    format!("file-{n:024x}")
}

fn batch_id(n: u64) -> String {
    format!("batch_{n:024x}")
}

fn file(owner: &str, n: u64, purpose: &str) -> FileRecord {
    let id = file_id(n);
    FileRecord {
        owner: owner.into(),
        blob: format!("files/{id}"),
        file: FileObject::new(id, 10 + n, 1_700_000_000 + n, format!("input-{n}.jsonl"), purpose.into()),
    }
}

fn expiring(mut record: FileRecord, at: u64) -> FileRecord {
    record.file.expires_at = Some(at);
    record
}

fn batch_object(n: u64, input: &str, status: BatchStatus) -> Batch {
    serde_json::from_value(json!({
        "id": batch_id(n),
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": input,
        "completion_window": "24h",
        "status": status,
        "created_at": 1_700_000_000 + n,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": {"n": n.to_string()},
    }))
    .expect("a batch object")
}

fn batch(owner: &str, n: u64, input: &str) -> BatchRecord {
    BatchRecord {
        owner: owner.into(),
        batch: batch_object(n, input, BatchStatus::Validating),
        cancel_requested_at: None,
    }
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|item| id(item).to_string()).collect()
}

fn file_ids(items: &[FileRecord]) -> Vec<String> {
    ids(items, |f| &f.file.id)
}

fn batch_ids(items: &[BatchRecord]) -> Vec<String> {
    ids(items, |b| &b.batch.id)
}

fn query(order: Order, after: Option<String>, limit: usize) -> FileQuery {
    FileQuery { purpose: None, order, after, limit }
}

async fn acquired(meta: &Meta, batch_id: &str) -> Lease {
    meta.acquire(batch_id, HOLDER, TTL).await.unwrap().expect("the lease is free")
}

/// The runner's write of `batch` alone.
async fn save_batch(meta: &Meta, lease: &Lease, batch: &Batch) -> bool {
    meta.save(lease, Progress { batch, segment: None, files: &[] }).await.unwrap()
}

async fn owners_see_only_their_own(backend: Backend) {
    let meta = backend.open();
    let input = file(ALICE, 1, "batch");
    meta.insert_file(&input).await.unwrap();
    meta.insert_batch(&batch(ALICE, 1, &input.file.id)).await.unwrap();

    assert_eq!(meta.file(ALICE, &input.file.id, 0).await.unwrap(), Some(input.clone()));
    assert_eq!(meta.file(BOB, &input.file.id, 0).await.unwrap(), None);
    assert!(meta.list_files(BOB, &query(Order::Asc, None, 10), 0).await.unwrap().items.is_empty());
    assert_eq!(meta.delete_file(BOB, &input.file.id).await.unwrap(), Deletion::NotFound);
    assert_eq!(meta.batch(ALICE, &batch_id(1)).await.unwrap(), Some(batch(ALICE, 1, &input.file.id)));
    assert_eq!(meta.batch(BOB, &batch_id(1)).await.unwrap(), None);
    assert!(meta.list_batches(BOB, None, 10).await.unwrap().items.is_empty());
    assert_eq!(meta.request_cancel(BOB, &batch_id(1), 5).await.unwrap(), None);
    // Bob's cancel changed nothing.
    assert_eq!(meta.batch(ALICE, &batch_id(1)).await.unwrap().unwrap().cancel_requested_at, None);
    // The empty owner (a gateway without keys) is an owner like any other.
    assert_eq!(meta.file("", &input.file.id, 0).await.unwrap(), None);
}

async fn files_list_in_order_by_page(backend: Backend) {
    let meta = backend.open();
    for n in [3, 1, 5, 2, 4] {
        let purpose = if n % 2 == 0 { "batch_output" } else { "batch" };
        meta.insert_file(&file(ALICE, n, purpose)).await.unwrap();
    }
    meta.insert_file(&file(BOB, 6, "batch")).await.unwrap();

    let first = meta.list_files(ALICE, &query(Order::Asc, None, 2), 0).await.unwrap();
    assert_eq!(file_ids(&first.items), [file_id(1), file_id(2)]);
    assert!(first.has_more);
    let second = meta.list_files(ALICE, &query(Order::Asc, Some(file_id(2)), 2), 0).await.unwrap();
    assert_eq!(file_ids(&second.items), [file_id(3), file_id(4)]);
    assert!(second.has_more);
    let last = meta.list_files(ALICE, &query(Order::Asc, Some(file_id(4)), 2), 0).await.unwrap();
    assert_eq!(file_ids(&last.items), [file_id(5)]);
    assert!(!last.has_more);
    let exactly = meta.list_files(ALICE, &query(Order::Asc, Some(file_id(3)), 2), 0).await.unwrap();
    assert_eq!(file_ids(&exactly.items), [file_id(4), file_id(5)]);
    assert!(!exactly.has_more, "nothing follows the last file");

    let newest = meta.list_files(ALICE, &query(Order::Desc, None, 3), 0).await.unwrap();
    assert_eq!(file_ids(&newest.items), [file_id(5), file_id(4), file_id(3)]);
    assert!(newest.has_more);
    let older = meta.list_files(ALICE, &query(Order::Desc, Some(file_id(3)), 3), 0).await.unwrap();
    assert_eq!(file_ids(&older.items), [file_id(2), file_id(1)]);
    assert!(!older.has_more);

    let batch_files = FileQuery { purpose: Some("batch".into()), ..query(Order::Asc, None, 2) };
    let page = meta.list_files(ALICE, &batch_files, 0).await.unwrap();
    assert_eq!(file_ids(&page.items), [file_id(1), file_id(3)]);
    assert!(page.has_more);
    let rest = meta.list_files(ALICE, &FileQuery { after: Some(file_id(3)), ..batch_files }, 0).await.unwrap();
    assert_eq!(file_ids(&rest.items), [file_id(5)]);
    assert!(!rest.has_more);
    let outputs = FileQuery { purpose: Some("batch_output".into()), ..query(Order::Desc, None, 10) };
    assert_eq!(file_ids(&meta.list_files(ALICE, &outputs, 0).await.unwrap().items), [file_id(4), file_id(2)]);
    let none = FileQuery { purpose: Some("vision".into()), ..query(Order::Asc, None, 10) };
    assert_eq!(
        meta.list_files(ALICE, &none, 0).await.unwrap(),
        modelgate_batch::store::Page { items: vec![], has_more: false }
    );
}

async fn expired_files_are_hidden(backend: Backend) {
    let meta = backend.open();
    let short = expiring(file(ALICE, 1, "batch_output"), 100);
    let long = expiring(file(ALICE, 2, "batch_output"), 200);
    let forever = file(ALICE, 3, "batch");
    for record in [&short, &long, &forever] {
        meta.insert_file(record).await.unwrap();
    }

    assert_eq!(meta.file(ALICE, &short.file.id, 99).await.unwrap(), Some(short.clone()));
    assert_eq!(meta.file(ALICE, &short.file.id, 100).await.unwrap(), None, "expired at its expires_at");
    let listed = meta.list_files(ALICE, &query(Order::Asc, None, 1), 150).await.unwrap();
    assert_eq!(file_ids(&listed.items), [file_id(2)]);
    assert!(listed.has_more);
    let listed = meta.list_files(ALICE, &query(Order::Asc, None, 10), 1000).await.unwrap();
    assert_eq!(file_ids(&listed.items), [file_id(3)]);

    assert!(meta.expired_files(99, 10).await.unwrap().is_empty());
    assert_eq!(meta.expired_files(1000, 10).await.unwrap(), [short.clone(), long.clone()]);
    assert_eq!(meta.expired_files(1000, 1).await.unwrap(), std::slice::from_ref(&short));
    assert_eq!(meta.delete_file(ALICE, &short.file.id).await.unwrap(), Deletion::Deleted(short));
    assert_eq!(meta.expired_files(1000, 10).await.unwrap(), [long]);
}

async fn a_file_in_use_is_not_deleted(backend: Backend) {
    let meta = backend.open();
    let input = file(ALICE, 1, "batch");
    meta.insert_file(&input).await.unwrap();
    meta.insert_batch(&batch(ALICE, 1, &input.file.id)).await.unwrap();
    meta.insert_batch(&batch(ALICE, 2, &input.file.id)).await.unwrap();

    let Deletion::InUse { batch_id: user } = meta.delete_file(ALICE, &input.file.id).await.unwrap() else {
        panic!("deleted while batches read it");
    };
    assert!([batch_id(1), batch_id(2)].contains(&user));
    assert_eq!(meta.file(ALICE, &input.file.id, 0).await.unwrap(), Some(input.clone()));

    for n in [1, 2] {
        let lease = acquired(&meta, &batch_id(n)).await;
        assert!(save_batch(&meta, &lease, &batch_object(n, &input.file.id, BatchStatus::Completed)).await);
    }
    assert_eq!(meta.delete_file(ALICE, &input.file.id).await.unwrap(), Deletion::Deleted(input.clone()));
    assert_eq!(meta.delete_file(ALICE, &input.file.id).await.unwrap(), Deletion::NotFound);
    assert_eq!(meta.file(ALICE, &input.file.id, 0).await.unwrap(), None);
}

async fn batches_list_newest_first(backend: Backend) {
    let meta = backend.open();
    for n in [2, 4, 1, 3] {
        meta.insert_batch(&batch(ALICE, n, &file_id(1))).await.unwrap();
    }
    meta.insert_batch(&batch(BOB, 5, &file_id(1))).await.unwrap();

    let first = meta.list_batches(ALICE, None, 3).await.unwrap();
    assert_eq!(batch_ids(&first.items), [batch_id(4), batch_id(3), batch_id(2)]);
    assert!(first.has_more);
    let rest = meta.list_batches(ALICE, Some(&batch_id(2)), 3).await.unwrap();
    assert_eq!(batch_ids(&rest.items), [batch_id(1)]);
    assert!(!rest.has_more);
    assert_eq!(meta.list_batches(ALICE, None, 3).await.unwrap().items[0], batch(ALICE, 4, &file_id(1)));
    assert_eq!(meta.active_batches().await.unwrap(), (1..=5).map(batch_id).collect::<Vec<_>>());
}

async fn a_cancel_is_asked_once(backend: Backend) {
    let meta = backend.open();
    meta.insert_batch(&batch(ALICE, 1, &file_id(1))).await.unwrap();

    let asked = meta.request_cancel(ALICE, &batch_id(1), 10).await.unwrap().expect("alice's batch");
    assert_eq!(asked.cancel_requested_at, Some(10));
    let view = asked.view();
    assert_eq!((view.status, view.cancelling_at), (BatchStatus::Cancelling, Some(10)));
    let again = meta.request_cancel(ALICE, &batch_id(1), 20).await.unwrap().expect("alice's batch");
    assert_eq!(again.cancel_requested_at, Some(10), "the first ask's time is kept");
    assert_eq!(meta.batch(ALICE, &batch_id(1)).await.unwrap(), Some(again));

    meta.insert_batch(&batch(ALICE, 2, &file_id(1))).await.unwrap();
    let lease = acquired(&meta, &batch_id(2)).await;
    let completed = batch_object(2, &file_id(1), BatchStatus::Completed);
    assert!(save_batch(&meta, &lease, &completed).await);
    let finished = meta.request_cancel(ALICE, &batch_id(2), 30).await.unwrap().expect("alice's batch");
    assert_eq!(finished, BatchRecord { owner: ALICE.into(), batch: completed, cancel_requested_at: None });
    assert_eq!(finished.view().status, BatchStatus::Completed);
}

async fn a_lease_is_exclusive_until_it_expires(backend: Backend) {
    let meta = backend.open();
    meta.insert_batch(&batch(ALICE, 1, &file_id(1))).await.unwrap();
    let first = acquired(&meta, &batch_id(1)).await;
    assert_eq!(first.batch_id, batch_id(1));
    assert_eq!(meta.acquire(&batch_id(1), "replica-b", TTL).await.unwrap(), None);
    assert_eq!(meta.acquire(&batch_id(1), HOLDER, TTL).await.unwrap(), None, "not even for the same holder");
    assert!(meta.renew(&first, TTL).await.unwrap());

    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    assert!(!meta.renew(&first, TTL).await.unwrap(), "an expired lease is not renewed");
    let second = meta.acquire(&batch_id(1), "replica-b", TTL).await.unwrap().expect("the lease expired");
    assert_ne!(second.token, first.token);
    assert!(!meta.renew(&first, TTL).await.unwrap());
    meta.release(&first).await.unwrap();
    assert_eq!(meta.acquire(&batch_id(1), HOLDER, TTL).await.unwrap(), None, "a stale release frees nothing");

    assert!(meta.renew(&second, TTL).await.unwrap());
    meta.release(&second).await.unwrap();
    assert!(!meta.renew(&second, TTL).await.unwrap());
    let third = meta.acquire(&batch_id(1), HOLDER, TTL).await.unwrap().expect("released");
    assert_ne!(third.token, first.token, "a holder's tokens differ from one holding to the next");
}

async fn a_stale_save_writes_nothing(backend: Backend) {
    let meta = backend.open();
    let original = batch(ALICE, 1, &file_id(1));
    meta.insert_batch(&original).await.unwrap();
    let stale = acquired(&meta, &batch_id(1)).await;
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;

    let output = expiring(file(ALICE, 2, "batch_output"), 2_000_000_000);
    let mut progressed = batch_object(1, &file_id(1), BatchStatus::InProgress);
    progressed.request_counts.completed = 3;
    let progress =
        Progress { batch: &progressed, segment: Some("segments/stale-1"), files: std::slice::from_ref(&output) };
    assert!(!meta.save(&stale, progress).await.unwrap(), "expired, even though no one took it");
    let current = acquired(&meta, &batch_id(1)).await;
    assert!(!meta.save(&stale, progress).await.unwrap(), "taken by another");

    assert_eq!(meta.running(&batch_id(1)).await.unwrap(), Some((original.clone(), vec![])));
    assert_eq!(meta.file(ALICE, &output.file.id, 0).await.unwrap(), None);
    assert!(meta.save(&current, progress).await.unwrap());
    assert_eq!(meta.batch(ALICE, &batch_id(1)).await.unwrap().unwrap().batch, progressed);
}

async fn a_save_writes_batch_segment_and_files_together(backend: Backend) {
    let meta = backend.open();
    let input = file(ALICE, 1, "batch");
    meta.insert_file(&input).await.unwrap();
    meta.insert_batch(&batch(ALICE, 1, &input.file.id)).await.unwrap();
    let lease = acquired(&meta, &batch_id(1)).await;

    let mut running = batch_object(1, &input.file.id, BatchStatus::InProgress);
    running.in_progress_at = Some(1_700_000_100);
    running.request_counts = modelgate_proto::batch::RequestCounts { total: 4, completed: 2, failed: 1 };
    let progress = Progress { batch: &running, segment: Some("segments/a-1"), files: &[] };
    assert!(meta.save(&lease, progress).await.unwrap());
    assert!(meta.save(&lease, progress).await.unwrap(), "a repeated save is harmless");
    let (record, segments) = meta.running(&batch_id(1)).await.unwrap().expect("the batch");
    assert_eq!(record.batch, running);
    assert_eq!(segments, ["segments/a-1"], "a segment is committed once");

    let output = expiring(file(ALICE, 2, "batch_output"), 2_000_000_000);
    let errors = expiring(file(ALICE, 3, "batch_output"), 2_000_000_000);
    let mut finalizing = running.clone();
    finalizing.status = BatchStatus::Finalizing;
    finalizing.output_file_id = Some(output.file.id.clone());
    finalizing.error_file_id = Some(errors.file.id.clone());
    let files = [output.clone(), errors.clone()];
    assert!(meta
        .save(&lease, Progress { batch: &finalizing, segment: Some("segments/a-2"), files: &files })
        .await
        .unwrap());
    assert!(meta.save(&lease, Progress { batch: &finalizing, segment: None, files: &files }).await.unwrap());

    let (record, segments) = meta.running(&batch_id(1)).await.unwrap().expect("the batch");
    assert_eq!(record.batch, finalizing);
    assert_eq!(segments, ["segments/a-1", "segments/a-2"]);
    assert_eq!(meta.file(ALICE, &output.file.id, 0).await.unwrap(), Some(output.clone()));
    assert_eq!(meta.file(ALICE, &errors.file.id, 0).await.unwrap(), Some(errors.clone()));
    let outputs = FileQuery { purpose: Some("batch_output".into()), ..query(Order::Asc, None, 10) };
    assert_eq!(meta.list_files(ALICE, &outputs, 0).await.unwrap().items, [output, errors]);
}

async fn a_terminal_save_ends_the_batch(backend: Backend) {
    let meta = backend.open();
    let input = file(ALICE, 1, "batch");
    meta.insert_file(&input).await.unwrap();
    meta.insert_batch(&batch(ALICE, 1, &input.file.id)).await.unwrap();
    meta.insert_batch(&batch(ALICE, 2, &file_id(9))).await.unwrap();
    assert_eq!(meta.active_batches().await.unwrap(), [batch_id(1), batch_id(2)]);

    let lease = acquired(&meta, &batch_id(1)).await;
    let running = batch_object(1, &input.file.id, BatchStatus::InProgress);
    assert!(meta.save(&lease, Progress { batch: &running, segment: Some("segments/a-1"), files: &[] }).await.unwrap());
    assert_eq!(meta.active_batches().await.unwrap(), [batch_id(1), batch_id(2)]);

    let mut cancelled = running.clone();
    cancelled.status = BatchStatus::Cancelled;
    cancelled.cancelled_at = Some(1_700_000_200);
    assert!(save_batch(&meta, &lease, &cancelled).await);
    assert_eq!(meta.active_batches().await.unwrap(), [batch_id(2)]);
    let (record, segments) = meta.running(&batch_id(1)).await.unwrap().expect("the batch");
    assert_eq!(record.batch, cancelled);
    assert!(segments.is_empty(), "a finished batch's segments are forgotten");
    assert_eq!(meta.delete_file(ALICE, &input.file.id).await.unwrap(), Deletion::Deleted(input));
    assert_eq!(meta.running(&batch_id(7)).await.unwrap(), None);
}

async fn segments_come_back_in_commit_order(backend: Backend) {
    let meta = backend.open();
    meta.insert_batch(&batch(ALICE, 1, &file_id(1))).await.unwrap();
    let lease = acquired(&meta, &batch_id(1)).await;
    let running = batch_object(1, &file_id(1), BatchStatus::InProgress);
    let committed = ["segments/z", "segments/b", "segments/y", "segments/a"];
    for segment in committed {
        assert!(meta.save(&lease, Progress { batch: &running, segment: Some(segment), files: &[] }).await.unwrap());
    }
    assert_eq!(meta.running(&batch_id(1)).await.unwrap().expect("the batch").1, committed);
}

async fn everything_survives_reopening(backend: Backend) {
    let input = file(ALICE, 1, "batch");
    let output = expiring(file(ALICE, 2, "batch_output"), 2_000_000_000);
    let mut running = batch_object(1, &input.file.id, BatchStatus::InProgress);
    running.output_file_id = Some(output.file.id.clone());
    let lease = {
        let meta = backend.open();
        meta.insert_file(&input).await.unwrap();
        meta.insert_batch(&batch(ALICE, 1, &input.file.id)).await.unwrap();
        meta.insert_batch(&batch(BOB, 2, &file_id(5))).await.unwrap();
        meta.request_cancel(BOB, &batch_id(2), 42).await.unwrap();
        let lease = meta.acquire(&batch_id(1), HOLDER, Duration::from_secs(60)).await.unwrap().expect("free");
        let files = std::slice::from_ref(&output);
        assert!(meta.save(&lease, Progress { batch: &running, segment: Some("segments/a-1"), files }).await.unwrap());
        lease
    };

    let meta = backend.open();
    assert_eq!(meta.file(ALICE, &input.file.id, 0).await.unwrap(), Some(input.clone()));
    assert_eq!(meta.file(ALICE, &output.file.id, 0).await.unwrap(), Some(output));
    let (record, segments) = meta.running(&batch_id(1)).await.unwrap().expect("the batch");
    assert_eq!(record.batch, running);
    assert_eq!(segments, ["segments/a-1"]);
    assert_eq!(meta.batch(BOB, &batch_id(2)).await.unwrap().unwrap().cancel_requested_at, Some(42));
    assert_eq!(meta.active_batches().await.unwrap(), [batch_id(1), batch_id(2)]);
    assert!(matches!(meta.delete_file(ALICE, &input.file.id).await.unwrap(), Deletion::InUse { .. }));
    assert_eq!(meta.acquire(&batch_id(1), "replica-b", TTL).await.unwrap(), None, "the lease is still held");
    assert!(meta.renew(&lease, TTL).await.unwrap());
    assert!(save_batch(&meta, &lease, &running).await);
}

/// Random sets of files and batches, walked page by page: every record the
/// owner should see comes once, in order, and `has_more` says whether more follow.
async fn lists_walk_every_record_once(backend: Backend) {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    const PURPOSES: [&str; 3] = ["batch", "batch_output", "vision"];
    let meta = backend.open();
    let mut runner = TestRunner::default();
    let cases = (
        prop::collection::vec((0..PURPOSES.len(), prop::option::of(0..10u64)), 0..16),
        0..12u64,
        1..6usize,
        any::<bool>(),
        prop::option::of(0..PURPOSES.len()),
        0..10u64,
    );
    for case in 0..u64::from(runner.config().cases) {
        let (files, batches, limit, ascending, purpose, now) = cases.new_tree(&mut runner).unwrap().current();
        let context = format!(
            "{files:?}, {batches} batches, limit {limit}, ascending {ascending}, purpose {purpose:?}, now {now}"
        );
        // Each case its own owner (and ids): the cases share the store.
        let owner = format!("owner-{case}");
        let first = case * 100;
        let mut expected = Vec::new();
        for (n, (purpose_index, expires_at)) in (first..).zip(&files) {
            let mut record = file(&owner, n, PURPOSES[*purpose_index]);
            record.file.expires_at = *expires_at;
            meta.insert_file(&record).await.unwrap();
            if !record.expired(now) && purpose.is_none_or(|p| p == *purpose_index) {
                expected.push(record.file.id);
            }
        }
        let order = if ascending { Order::Asc } else { Order::Desc };
        if !ascending {
            expected.reverse();
        }
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let query = FileQuery { purpose: purpose.map(|p| PURPOSES[p].to_string()), order, after, limit };
            let page = meta.list_files(&owner, &query, now).await.unwrap();
            assert!(page.items.len() <= limit, "{context}");
            seen.extend(file_ids(&page.items));
            assert_eq!(page.has_more, seen.len() < expected.len(), "{context}: {seen:?} of {expected:?}");
            if !page.has_more {
                break;
            }
            after = seen.last().cloned();
        }
        assert_eq!(seen, expected, "{context}");

        for n in first..first + batches {
            meta.insert_batch(&batch(&owner, n, &file_id(first))).await.unwrap();
        }
        let expected: Vec<String> = (first..first + batches).rev().map(batch_id).collect();
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let page = meta.list_batches(&owner, after.as_deref(), limit).await.unwrap();
            assert!(page.items.len() <= limit, "{context}");
            seen.extend(batch_ids(&page.items));
            assert_eq!(page.has_more, seen.len() < expected.len(), "{context}: {seen:?} of {expected:?}");
            if !page.has_more {
                break;
            }
            after = seen.last().cloned();
        }
        assert_eq!(seen, expected, "{context}");
    }
}

fn stored_response(id: &str) -> StoredResponse {
    StoredResponse {
        response: json!({"id": id, "object": "response", "output": [{"type": "message", "id": "msg_out"}]}),
        input: vec![json!({"type": "message", "id": "msg_in", "role": "user", "content": "hi"})],
    }
}

/// Far beyond any test's clock.
const LATER: u64 = 4_000_000_000;

async fn stored_responses_are_their_owners(backend: Backend) {
    let meta = backend.open();
    let now = clock::unix_seconds();
    let stored = stored_response("resp_1");
    meta.put_response(ALICE, &stored, LATER).await.unwrap();
    assert_eq!(meta.response(ALICE, "resp_1", now).await.unwrap(), Some(stored.clone()));
    assert_eq!(meta.response(BOB, "resp_1", now).await.unwrap(), None, "another owner's id is not found");
    let mut other = stored_response("resp_1");
    other.input.clear();
    meta.put_response(BOB, &other, LATER).await.unwrap();
    assert_eq!(meta.response(ALICE, "resp_1", now).await.unwrap(), Some(stored.clone()), "nor overwritten");
    assert!(!meta.delete_response(BOB, "resp_1", now).await.unwrap(), "nor deleted");
    meta.put_response(ALICE, &stored, LATER).await.unwrap();
    assert_eq!(meta.response(ALICE, "resp_1", now).await.unwrap(), Some(stored), "a repeated write lands once");
    assert!(meta.delete_response(ALICE, "resp_1", now).await.unwrap());
    assert_eq!(meta.response(ALICE, "resp_1", now).await.unwrap(), None);
    assert!(!meta.delete_response(ALICE, "resp_1", now).await.unwrap());
}

async fn an_expired_response_is_gone(backend: Backend) {
    let meta = backend.open();
    let now = clock::unix_seconds();
    meta.put_response(ALICE, &stored_response("resp_old"), now - 1).await.unwrap();
    meta.put_response(ALICE, &stored_response("resp_new"), LATER).await.unwrap();
    assert_eq!(meta.response(ALICE, "resp_old", now).await.unwrap(), None);
    assert!(!meta.delete_response(ALICE, "resp_old", now).await.unwrap());
    meta.delete_expired_responses(now).await.unwrap();
    assert_eq!(meta.response(ALICE, "resp_old", 0).await.unwrap(), None, "swept, whatever the clock");
    assert!(meta.response(ALICE, "resp_new", now).await.unwrap().is_some(), "the others stay");
}

async fn a_stored_response_survives_reopening(backend: Backend) {
    backend.open().put_response(ALICE, &stored_response("resp_1"), LATER).await.unwrap();
    let meta = backend.open();
    let now = clock::unix_seconds();
    assert_eq!(meta.response(ALICE, "resp_1", now).await.unwrap(), Some(stored_response("resp_1")));
    assert_eq!(meta.response(BOB, "resp_1", now).await.unwrap(), None);
}

/// Each test of the suite, once per store; a store whose server is missing skips.
macro_rules! suite {
    ($store:ident: $($test:ident),* $(,)?) => {
        mod $store {
            $(
                #[tokio::test]
                async fn $test() {
                    if let Some(backend) = super::Backend::$store() {
                        super::$test(backend).await;
                    }
                }
            )*
        }
    };
}

macro_rules! both {
    ($($test:ident),* $(,)?) => {
        suite!(sqlite: $($test),*);
        suite!(redis: $($test),*);
    };
}

both!(
    owners_see_only_their_own,
    files_list_in_order_by_page,
    expired_files_are_hidden,
    a_file_in_use_is_not_deleted,
    batches_list_newest_first,
    a_cancel_is_asked_once,
    a_lease_is_exclusive_until_it_expires,
    a_stale_save_writes_nothing,
    a_save_writes_batch_segment_and_files_together,
    a_terminal_save_ends_the_batch,
    segments_come_back_in_commit_order,
    everything_survives_reopening,
    lists_walk_every_record_once,
    stored_responses_are_their_owners,
    an_expired_response_is_gone,
    a_stored_response_survives_reopening,
);

#[tokio::test]
async fn a_redis_that_does_not_answer_is_an_error_not_a_hang() {
    let Some(redis) = common::Redis::start() else {
        return;
    };
    let timeout = Duration::from_millis(200);
    let meta = Meta::open(Some(&redis.url()), std::path::Path::new("/nonexistent"), timeout).unwrap();
    meta.insert_batch(&batch(ALICE, 1, &file_id(1))).await.unwrap();

    redis.pause();
    let started = std::time::Instant::now();
    assert!(meta.batch(ALICE, &batch_id(1)).await.is_err());
    assert!(meta.acquire(&batch_id(1), HOLDER, TTL).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2), "each call is bounded by the timeout");
    redis.resume();

    // Back as soon as Redis is: the connection is made again by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match meta.batch(ALICE, &batch_id(1)).await {
            Ok(found) => break assert_eq!(found, Some(batch(ALICE, 1, &file_id(1)))),
            Err(e) if std::time::Instant::now() > deadline => panic!("Redis is back but the store is not: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[test]
fn a_database_from_a_newer_modelgate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batches.sqlite");
    drop(modelgate_batch::store::sqlite::SqliteMeta::open(&path).expect("a new database"));
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 3).unwrap();
    let refused = modelgate_batch::store::sqlite::SqliteMeta::open(&path).err().expect("refused");
    assert!(refused.contains("schema version 3 is newer"), "{refused}");

    std::fs::write(dir.path().join("garbage.sqlite"), b"not a database, not at all").unwrap();
    assert!(modelgate_batch::store::sqlite::SqliteMeta::open(&dir.path().join("garbage.sqlite")).is_err());
}

/// A database from before stored responses keeps its records and gains them.
#[tokio::test]
async fn a_database_from_before_stored_responses_is_brought_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batches.sqlite");
    let input = file(ALICE, 1, "batch");
    modelgate_batch::store::sqlite::SqliteMeta::open(&path).unwrap().insert_file(&input).await.unwrap();
    let old = rusqlite::Connection::open(&path).unwrap();
    old.execute_batch("DROP TABLE responses; PRAGMA user_version = 1;").unwrap();
    drop(old);
    let meta = modelgate_batch::store::sqlite::SqliteMeta::open(&path).expect("migrated");
    assert_eq!(meta.file(ALICE, &input.file.id, 0).await.unwrap(), Some(input));
    meta.put_response(ALICE, &stored_response("resp_1"), LATER).await.unwrap();
    assert!(meta.response(ALICE, "resp_1", 0).await.unwrap().is_some());
}

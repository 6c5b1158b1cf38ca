//! Fuzz Microsoft Graph's error answers (`upstream::graph`): any body with any HTTP status and
//! any `Retry-After` is parsed and classified for every request the transport makes, without
//! panicking, and what reaches the log stays on one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::upstream::graph::classify::{self, Context, Step};
use postern::upstream::graph::request::{Answer, GraphError, parse_retry_after};

const STEPS: [Step; 6] = [
    Step::SendMail,
    Step::CreateDraft,
    Step::UpdateDraft,
    Step::SendDraft,
    Step::ReadDraft,
    Step::DeleteDraft,
];

fuzz_target!(|data: &[u8]| {
    // Two bytes of status, one of Retry-After length, the header, then the body.
    let Some((head, rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let status = u16::from_be_bytes([head[0], head[1]]) % 600;
    let split = usize::from(head[2]).min(rest.len());
    let (retry, body) = rest.split_at(split);
    let retry_after = std::str::from_utf8(retry).ok().and_then(parse_retry_after);
    let error = GraphError::parse(body);
    let answer = Answer {
        status,
        request_id: error.as_ref().and_then(|e| e.request_id.clone()),
        client_request_id: "00000000-0000-0000-0000-000000000000".into(),
        retry_after,
        location: None,
        body: body.to_vec(),
        error,
    };
    for line in [answer.summary(), answer.ids()] {
        assert!(
            !line.contains(['\r', '\n']),
            "log text spans lines: {line:?}"
        );
    }
    let pending = ["a@fabrikam.com".to_string(), "b@fabrikam.com".to_string()];
    let refused = classify::invalid_recipients(&answer, &pending);
    assert!(refused.iter().all(|r| pending.contains(r)));
    for step in STEPS {
        for app_only in [true, false] {
            let ctx = Context {
                server: "graph.microsoft.com",
                account: "contoso",
                client_id: "11111111-2222-3333-4444-555555555555",
                app_only,
                mailbox: "scanner@contoso.com",
                sender: "printer@contoso.com",
                from: Some("printer@contoso.com"),
                queue_id: "6616B12BD9CC6000",
            };
            let _ = classify::outcome(&answer, step, &ctx);
        }
    }
});

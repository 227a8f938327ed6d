//! Fuzz MQTT over WebSocket (`ferrymq_server::websocket`): any bytes from a client, first as
//! an HTTP upgrade request to `/mqtt`, then as WebSocket frames after the upgrade, read
//! through the adapter that turns binary messages into the byte stream the MQTT decoder
//! reads. Errors, never a panic or a read past the size limit.
#![no_main]

use ferrymq_server::websocket::{accept, WsStream};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;

const MAX_PACKET: usize = 64 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// Everything the broker side reads from `ws` until an error or the end, bounded.
async fn drain<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut ws: WsStream<S>,
    input: usize,
) {
    let mut buf = vec![0u8; 4096];
    let mut total = 0usize;
    while let Ok(Ok(n)) =
        tokio::time::timeout(std::time::Duration::from_millis(50), ws.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        total += n;
        assert!(total <= input, "read more bytes than the client sent");
    }
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        // As an upgrade request.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let upgrade = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            accept(server, "/mqtt", &[], MAX_PACKET),
        )
        .await;
        if let Ok(Ok(ws)) = upgrade {
            drain(ws, data.len()).await;
        }
        // As frames after an upgrade.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let ws = WsStream::from_upgraded(server, Role::Server, MAX_PACKET).await;
        drain(ws, data.len()).await;
    });
});

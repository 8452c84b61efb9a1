//! wrenn's HTTP client ignores proxy settings in the environment (a machine set up for a
//! registry proxy must still reach its own agents and guests). Its own test binary: it sets an
//! environment variable, which no other test may race with.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wrenn_http::client::{ClientOptions, client, describe};

#[tokio::test]
async fn proxies_in_the_environment_are_not_used() {
    // SAFETY: the only test of this binary, and it sets the variables before the runtime's
    // other threads or any client read the environment.
    unsafe {
        std::env::set_var("HTTP_PROXY", "http://127.0.0.1:9");
        std::env::set_var("http_proxy", "http://127.0.0.1:9");
        std::env::set_var("ALL_PROXY", "http://127.0.0.1:9");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request).await;
        let _ = stream
            .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            .await;
    });
    // Through the proxy (nothing listens on port 9) the call would fail.
    let response = client(ClientOptions::default())
        .get(format!("http://{address}/"))
        .send()
        .await
        .map_err(|e| describe(&e))
        .unwrap();
    assert_eq!(response.status(), 204);
}

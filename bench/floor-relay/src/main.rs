//! The floor of the stream guard's hop, for `make bench`: Envoy's first pass
//! sends each request here, and this joins the connection to one to Envoy's
//! second listener, copying bytes both ways. A guarded stream crosses a
//! process between Envoy's two passes; this is the least such a process does
//! (no HTTP, no framing, no usage), so what a stream through it costs over the
//! two-pass floor is the price of the hop alone.

use clap::Parser;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "A TCP relay: each connection to --listen is joined to a new one to --upstream")]
struct Args {
    /// Address to accept connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address each connection is relayed to.
    #[arg(long)]
    upstream: SocketAddr,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // One worker thread, as the benchmark runs the stream guard.
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?.block_on(relay(args))
}

async fn relay(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    loop {
        let (mut downstream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(args.upstream).await else { return };
            // A stream's chunks are small: none may wait for the next (Nagle's algorithm).
            for socket in [&downstream, &upstream] {
                let _ = socket.set_nodelay(true);
            }
            let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
        });
    }
}

//! The benchmark's ceiling: what a trivial keep-alive HTTP server does on this machine.
//! Thread per connection; `/64k` answers 64 KiB, `/download` 1 GiB in 64 KiB writes, `/post`
//! and `/stream` read the body, anything else answers "Hello, World!". Usage: `ceiling PORT`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut out = stream;
    let big = vec![b'x'; 65536];
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split(' ').nth(1).unwrap_or("/").to_string();
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut remaining = length;
        let mut buf = [0u8; 65536];
        while remaining > 0 {
            let n = reader.read(&mut buf[..remaining.min(65536)])?;
            if n == 0 {
                return Ok(());
            }
            remaining -= n;
        }
        if path == "/download" {
            let chunks = 16 * 1024;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                chunks * 65536
            );
            out.write_all(head.as_bytes())?;
            for _ in 0..chunks {
                out.write_all(&big)?;
            }
            continue;
        }
        let body: Vec<u8> = match path.as_str() {
            "/64k" => big.clone(),
            "/post" | "/stream" => length.to_string().into_bytes(),
            _ => b"Hello, World!".to_vec(),
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        out.write_all(&[head.as_bytes(), &body].concat())?;
    }
}

fn main() -> std::io::Result<()> {
    let port = std::env::args().nth(1).unwrap_or_else(|| "8080".into());
    let listener = TcpListener::bind(("127.0.0.1", port.parse::<u16>().expect("a port number")))?;
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || serve(stream));
    }
    Ok(())
}

// A TLS client as Go programs write it: crypto/tls with its default settings (Go 1.24 offers
// X25519MLKEM768 first, Go 1.19 X25519), verifying the server against a CA file.
// Usage: tls_client HOST:PORT SERVERNAME CAFILE. Prints "ok 0x0304" (the TLS version) after the
// handshake, reads what the server sends until it closes, and exits 0.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

func fail(what string, err error) {
	fmt.Fprintln(os.Stderr, what+":", err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: tls_client HOST:PORT SERVERNAME CAFILE")
		os.Exit(2)
	}
	pem, err := os.ReadFile(os.Args[3])
	if err != nil {
		fail("CA file", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		fail("CA file", fmt.Errorf("no certificate in %s", os.Args[3]))
	}
	dialer := &net.Dialer{Timeout: 20 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", os.Args[1],
		&tls.Config{ServerName: os.Args[2], RootCAs: roots})
	if err != nil {
		fail("handshake", err)
	}
	defer conn.Close()
	fmt.Printf("ok 0x%04x\n", conn.ConnectionState().Version)
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", os.Args[2])
	io.Copy(io.Discard, conn)
}

// A vCenter simulator for v2p's tests: govmomi's simulator package (which Debian ships as source,
// golang-github-vmware-govmomi-dev; Debian ships no vcsim program) with the VPX model, served on
// 127.0.0.1 over TLS with a fresh RSA-2048 certificate (the package's built-in one is a 1024-bit test
// key OpenSSL refuses), so a client can verify it against a CA file or pin its SHA-256 fingerprint.
//
// The login it accepts comes from the environment (VCSIM_USER, VCSIM_PASSWORD), never from argv.
// It prints one JSON line on stdout: {"url", "fingerprint" (SHA-256, hex), "cert" (a PEM file)}, then
// serves until it gets SIGTERM or SIGINT, and removes its datastores' folders on the way out.
//
// Built by tests/vcsim/fixture.py in GOPATH mode (GO111MODULE=off) against /usr/share/gocode.
package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

func certificate(dir string) (tls.Certificate, string, string, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return tls.Certificate{}, "", "", err
	}
	template := x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &template, &template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", "", err
	}
	sum := sha256.Sum256(der)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	path := filepath.Join(dir, "vcsim.pem")
	if err := os.WriteFile(path, certPEM, 0o644); err != nil {
		return tls.Certificate{}, "", "", err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	return pair, hex.EncodeToString(sum[:]), path, err
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "vcsim:", err)
	os.Exit(1)
}

func main() {
	user, password := os.Getenv("VCSIM_USER"), os.Getenv("VCSIM_PASSWORD")
	if user == "" || password == "" {
		fail(fmt.Errorf("set VCSIM_USER and VCSIM_PASSWORD"))
	}
	dir, err := os.MkdirTemp("", "vcsim-")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(dir)
	pair, fingerprint, certFile, err := certificate(dir)
	if err != nil {
		fail(err)
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		fail(err)
	}
	defer model.Remove()
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(user, password)}
	server := model.Service.NewServer()
	defer server.Close()

	// Caught before the line below says it is up: a SIGTERM right after it still cleans up.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	where := *server.URL
	where.User = nil
	line, _ := json.Marshal(map[string]string{"url": where.String(), "fingerprint": fingerprint, "cert": certFile})
	fmt.Println(string(line))
	<-stop
}

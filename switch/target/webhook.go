package target

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/cutover/cutover/internal/redact"
)

// Webhook POSTs the flip as JSON and needs a 2xx answer. 5xx, 408, 429 and
// network errors are retried with backoff; other 4xx are final (the receiver
// has said no). 409 with a body containing "stale epoch" maps to
// ErrStaleEpoch, for receivers that keep the epoch.
type Webhook struct {
	url     string
	headers map[string]redact.Secret
	timeout time.Duration
	retries int
	client  *http.Client
	backoff time.Duration
}

// NewWebhook returns a webhook target. headers may hold secrets (they are
// sent, never logged).
func NewWebhook(rawURL string, headers map[string]redact.Secret, timeout time.Duration, retries int) *Webhook {
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	return &Webhook{url: rawURL, headers: headers, timeout: timeout, retries: retries, client: &http.Client{CheckRedirect: noRedirect}, backoff: 200 * time.Millisecond}
}

// noRedirect keeps the client from following redirects: a redirect would
// carry the flip (and, to the same host, its secret headers) wherever the
// receiver, or whoever took its address over, points. A 3xx is a failure.
func noRedirect(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// Name implements Target, without the URL's query or user info.
func (w *Webhook) Name() string {
	u, err := url.Parse(w.url)
	if err != nil {
		return "webhook"
	}
	return "webhook " + u.Scheme + "://" + u.Host + u.Path
}

// Flip implements Target.
func (w *Webhook) Flip(ctx context.Context, f Flip) error {
	body, err := json.Marshal(f)
	if err != nil {
		return err
	}
	var lastErr error
	for attempt := 0; attempt <= w.retries; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return fmt.Errorf("%w (last error: %v)", ctx.Err(), lastErr)
			case <-time.After(w.backoff << (attempt - 1)):
			}
		}
		retry, err := w.post(ctx, body, f)
		if err == nil {
			return nil
		}
		lastErr = err
		if !retry {
			return err
		}
	}
	return fmt.Errorf("after %d attempts: %w", w.retries+1, lastErr)
}

func (w *Webhook) post(ctx context.Context, body []byte, f Flip) (retry bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, w.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.url, bytes.NewReader(body))
	if err != nil {
		return false, fmt.Errorf("webhook request: %s", redact.Text(err.Error()))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "cutover")
	// Receivers can use it to make a retried flip a no-op.
	req.Header.Set("Idempotency-Key", fmt.Sprintf("%s-%d-%s", f.Plan, f.Epoch, f.To))
	req.Header.Set("X-Cutover-Epoch", strconv.FormatUint(f.Epoch, 10))
	for k, v := range w.headers {
		req.Header.Set(k, v.Reveal())
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return true, fmt.Errorf("POST %s: %s", w.Name(), redact.Text(err.Error()))
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return false, nil
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		return false, fmt.Errorf("%s answered %d, a redirect to %s: redirects are not followed (give the final URL)", w.Name(), resp.StatusCode, redactURL(resp.Header.Get("Location")))
	case resp.StatusCode == http.StatusConflict && bytes.Contains(bytes.ToLower(snippet), []byte("stale epoch")):
		return false, fmt.Errorf("%w: %s answered %d: %s", ErrStaleEpoch, w.Name(), resp.StatusCode, bytes.TrimSpace(snippet))
	case resp.StatusCode >= 500, resp.StatusCode == http.StatusRequestTimeout, resp.StatusCode == http.StatusTooManyRequests:
		return true, fmt.Errorf("%s answered %d: %s", w.Name(), resp.StatusCode, bytes.TrimSpace(snippet))
	default:
		return false, fmt.Errorf("%s answered %d: %s", w.Name(), resp.StatusCode, bytes.TrimSpace(snippet))
	}
}

// redactURL renders a URL without its user info and query, which may hold
// secrets.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "an unparsable location"
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

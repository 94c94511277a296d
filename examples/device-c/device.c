/*
 * device.c - a reference device for the trio-collector wire protocol, version 2.
 *
 * Written from docs/PROTOCOL.md alone (sections 1, 3, 4 and the test vectors of
 * section 6). It registers over UDP only (HELLO -> COOKIE -> HELLO -> WELCOME), sends a
 * few TELEMETRY datagrams, answers one COMMAND, and says GOODBYE.
 *
 * The file has four layers, from the bottom up; a firmware port replaces the first and
 * the last and keeps the middle two:
 *
 *   1. platform   random bytes, clocks                     (replace on a microcontroller)
 *   2. protocol   keys, datagram encoding, sealing, anti-replay window, minimal JSON
 *                 (pure functions on byte buffers: no sockets, no clocks, no printing)
 *   3. network    POSIX UDP sockets                         (replace with your IP stack)
 *   4. device     the session: registration, retransmission, commands, heartbeats,
 *                 and main(); plus the self-test of section 6 (`device --vectors`).
 *
 * Crypto is mbedTLS 2.28: ChaCha20-Poly1305 (mbedtls/chachapoly.h), HKDF-SHA256
 * (mbedtls/hkdf.h), HMAC-SHA256 (mbedtls/md.h), CTR-DRBG seeded from mbedTLS's entropy
 * sources (mbedtls/ctr_drbg.h, mbedtls/entropy.h).
 *
 * Plain C99 plus POSIX.1-2008 for the network layer and the clocks.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* network layer only */
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <mbedtls/chachapoly.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/hkdf.h>
#include <mbedtls/md.h>

/* ===================================================================================== */
/* Constants of the protocol                                                             */
/* ===================================================================================== */

#define PROTOCOL_VERSION 2

/* Datagram types, section 3.2. */
enum {
    T_HEARTBEAT = 1,
    T_TELEMETRY = 2,
    T_ACK = 3,
    T_COMMAND = 4,
    T_HELLO = 5,
    T_WELCOME = 6,
    T_GOODBYE = 7,
    T_COOKIE = 8
};

#define FLAG_ACK_REQUESTED 0x01 /* section 3.1: the only flag */

#define HEADER_LEN 20    /* section 3.1 */
#define TAG_LEN 16       /* ChaCha20-Poly1305, section 1.1 */
#define KEY_LEN 32
#define NONCE_LEN 12
#define MAX_DATAGRAM 1200 /* section 3.1; the WELCOME may announce a smaller one */
#define MIN_SESSION_DATAGRAM (HEADER_LEN + TAG_LEN) /* 36: an empty payload */
#define MAX_PAYLOAD (MAX_DATAGRAM - MIN_SESSION_DATAGRAM)

#define DIR_DEVICE_TO_COLLECTOR 0 /* section 1.3 */
#define DIR_COLLECTOR_TO_DEVICE 1

#define CLIENT_NONCE_LEN 16 /* section 3.5 */
#define SERVER_NONCE_LEN 16
#define COOKIE_LEN 16
#define COOKIE_DATAGRAM_LEN 76
#define WELCOME_MIN_LEN 76

#define MAX_DEVICE_ID 64 /* section 1.2 */
#define MAX_JSON_STRING 512 /* "id" and "name": 1 to 128 characters (section 2.2) */

/* Why a datagram was dropped: the names of section 5, plus "not ours". */
typedef enum {
    V_OK = 0,
    V_TOO_LARGE,
    V_MALFORMED,
    V_UNKNOWN_SESSION,
    V_BAD_TAG,
    V_REPLAY,
    V_NOT_OURS /* a COOKIE or WELCOME for a HELLO we no longer wait for */
} reason;

static const char *reason_name(reason r)
{
    switch (r) {
    case V_OK: return "ok";
    case V_TOO_LARGE: return "too_large";
    case V_MALFORMED: return "malformed";
    case V_UNKNOWN_SESSION: return "unknown_session";
    case V_BAD_TAG: return "bad_tag";
    case V_REPLAY: return "replay";
    case V_NOT_OURS: return "not for the HELLO we are waiting for";
    }
    return "?";
}

/* ===================================================================================== */
/* 1. Platform: replace these on a microcontroller                                       */
/* ===================================================================================== */

static mbedtls_entropy_context g_entropy;
static mbedtls_ctr_drbg_context g_drbg;
static int g_drbg_ready;

/* Fills buf with cryptographically strong random bytes; 0 on success.
 * On a board with a hardware TRNG, feed it to mbedTLS (MBEDTLS_ENTROPY_HARDWARE_ALT)
 * or replace this function. Nonces must never repeat (section 1.3). */
static int platform_random(uint8_t *buf, size_t len)
{
    if (!g_drbg_ready) {
        static const char personalization[] = "trio-collector device";
        mbedtls_entropy_init(&g_entropy);
        mbedtls_ctr_drbg_init(&g_drbg);
        if (mbedtls_ctr_drbg_seed(&g_drbg, mbedtls_entropy_func, &g_entropy,
                                  (const unsigned char *)personalization,
                                  sizeof personalization - 1) != 0)
            return -1;
        g_drbg_ready = 1;
    }
    return mbedtls_ctr_drbg_random(&g_drbg, buf, len) == 0 ? 0 : -1;
}

/* Device time in microseconds since the Unix epoch (conventions, top of PROTOCOL.md).
 * A device without a real-time clock may send its uptime, or 0. */
static uint64_t platform_time_us(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* A monotonic clock in milliseconds, for timeouts and retransmissions. */
static uint64_t platform_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ===================================================================================== */
/* 2. Protocol: pure functions on byte buffers                                           */
/* ===================================================================================== */

/* --- big-endian integers (conventions) ----------------------------------------------- */

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put_u64(uint8_t *p, uint64_t v)
{
    put_u32(p, (uint32_t)(v >> 32));
    put_u32(p + 4, (uint32_t)v);
}

static uint16_t get_u16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint32_t get_u32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t get_u64(const uint8_t *p) { return ((uint64_t)get_u32(p) << 32) | get_u32(p + 4); }

/* --- crypto wrappers (section 1.1) ---------------------------------------------------- */

static const mbedtls_md_info_t *sha256(void)
{
    return mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
}

/* ChaCha20-Poly1305 (RFC 8439): out receives len bytes of ciphertext, then the 16-byte tag. */
static int aead_seal(const uint8_t key[KEY_LEN], const uint8_t nonce[NONCE_LEN],
                     const uint8_t *ad, size_t ad_len, const uint8_t *plain, size_t len,
                     uint8_t *out)
{
    mbedtls_chachapoly_context ctx;
    int rc;
    mbedtls_chachapoly_init(&ctx);
    rc = mbedtls_chachapoly_setkey(&ctx, key);
    if (rc == 0)
        rc = mbedtls_chachapoly_encrypt_and_tag(&ctx, len, nonce, ad, ad_len, plain, out,
                                                out + len);
    mbedtls_chachapoly_free(&ctx);
    return rc;
}

/* Opens len bytes of ciphertext followed by the tag; 0 if the tag verified. */
static int aead_open(const uint8_t key[KEY_LEN], const uint8_t nonce[NONCE_LEN],
                     const uint8_t *ad, size_t ad_len, const uint8_t *sealed, size_t len,
                     uint8_t *plain)
{
    mbedtls_chachapoly_context ctx;
    int rc;
    mbedtls_chachapoly_init(&ctx);
    rc = mbedtls_chachapoly_setkey(&ctx, key);
    if (rc == 0)
        rc = mbedtls_chachapoly_auth_decrypt(&ctx, len, nonce, ad, ad_len, sealed + len, sealed,
                                             plain);
    mbedtls_chachapoly_free(&ctx);
    return rc;
}

/* --- credentials and keys (section 1.2) ----------------------------------------------- */

typedef struct {
    char device_id[MAX_DEVICE_ID + 1];
    size_t id_len;
    const uint8_t *secret; /* its UTF-8 bytes are the input keying material */
    size_t secret_len;
    uint8_t auth_key[KEY_LEN];  /* TCP registration proof only */
    uint8_t hello_d2c[KEY_LEN]; /* seals HELLO */
    uint8_t hello_c2d[KEY_LEN]; /* opens COOKIE */
} device_keys;

/* 1 to 64 characters from A-Z a-z 0-9 _ . : -  (section 1.2; the same set as metric names,
 * section 3.2). */
static int valid_name(const char *s, size_t len, size_t max)
{
    size_t i;
    if (len < 1 || len > max)
        return 0;
    for (i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == ':' || c == '-'))
            return 0;
    }
    return 1;
}

static int hkdf_expand_label(const uint8_t prk[32], const char *label, uint8_t out[KEY_LEN])
{
    return mbedtls_hkdf_expand(sha256(), prk, 32, (const unsigned char *)label, strlen(label),
                               out, KEY_LEN);
}

/* The per-device keys, which never change (section 1.2). 0 on success. */
static int derive_device_keys(device_keys *k, const char *device_id, const char *secret)
{
    uint8_t prk[32];
    size_t id_len = strlen(device_id);
    int rc;
    memset(k, 0, sizeof *k);
    if (!valid_name(device_id, id_len, MAX_DEVICE_ID))
        return -1;
    memcpy(k->device_id, device_id, id_len);
    k->id_len = id_len;
    k->secret = (const uint8_t *)secret;
    k->secret_len = strlen(secret);
    /* PRK = HKDF-Extract(salt = empty, ikm = secret); mbedTLS turns a NULL salt into
     * 32 zero bytes, as section 1.1 says. */
    rc = mbedtls_hkdf_extract(sha256(), NULL, 0, k->secret, k->secret_len, prk);
    if (rc == 0)
        rc = hkdf_expand_label(prk, "trio-collector/2 auth", k->auth_key);
    if (rc == 0)
        rc = hkdf_expand_label(prk, "trio-collector/2 hello device-to-collector", k->hello_d2c);
    if (rc == 0)
        rc = hkdf_expand_label(prk, "trio-collector/2 hello collector-to-device", k->hello_c2d);
    memset(prk, 0, sizeof prk);
    return rc;
}

/* The per-session keys (section 1.2):
 *   OKM = HKDF(salt = server_nonce | client_nonce, ikm = secret,
 *              info = "trio-collector/2 session" | u8 len(id) | id | u32 session_id, L = 64) */
static int derive_session_keys(const device_keys *k, const uint8_t server_nonce[16],
                               const uint8_t client_nonce[16], uint32_t session_id,
                               uint8_t d2c[KEY_LEN], uint8_t c2d[KEY_LEN])
{
    static const char label[] = "trio-collector/2 session";
    uint8_t salt[32], info[sizeof label - 1 + 1 + MAX_DEVICE_ID + 4], okm[64];
    size_t n = 0;
    int rc;
    memcpy(salt, server_nonce, 16);
    memcpy(salt + 16, client_nonce, 16);
    memcpy(info, label, sizeof label - 1);
    n += sizeof label - 1;
    info[n++] = (uint8_t)k->id_len;
    memcpy(info + n, k->device_id, k->id_len);
    n += k->id_len;
    put_u32(info + n, session_id);
    n += 4;
    rc = mbedtls_hkdf(sha256(), salt, sizeof salt, k->secret, k->secret_len, info, n, okm,
                      sizeof okm);
    if (rc == 0) {
        memcpy(d2c, okm, KEY_LEN);
        memcpy(c2d, okm + 32, KEY_LEN);
    }
    memset(okm, 0, sizeof okm);
    return rc;
}

static void to_hex(const uint8_t *in, size_t len, char *out)
{
    static const char digits[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < len; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * len] = '\0';
}

/* The TCP registration proof (section 1.2); this device registers over UDP and only uses
 * it in the self-test: hex(HMAC-SHA256(auth key, "register|" id "|" nonce "|" cnonce)). */
static int registration_proof(const device_keys *k, const char *nonce_hex,
                              const char *cnonce_hex, char out_hex[65])
{
    char msg[9 + MAX_DEVICE_ID + 1 + 32 + 1 + 32 + 1];
    uint8_t mac[32];
    int n = snprintf(msg, sizeof msg, "register|%s|%s|%s", k->device_id, nonce_hex, cnonce_hex);
    if (n < 0 || (size_t)n >= sizeof msg)
        return -1;
    if (mbedtls_md_hmac(sha256(), k->auth_key, KEY_LEN, (const unsigned char *)msg, (size_t)n,
                        mac) != 0)
        return -1;
    to_hex(mac, sizeof mac, out_hex);
    return 0;
}

/* --- the 20-byte header (section 3.1) ------------------------------------------------- */

typedef struct {
    uint8_t version, type, flags, reserved;
    uint32_t session_id, seq;
    uint64_t time_us;
} header;

static void header_write(uint8_t out[HEADER_LEN], uint8_t type, uint8_t flags,
                         uint32_t session_id, uint32_t seq, uint64_t time_us)
{
    out[0] = PROTOCOL_VERSION;
    out[1] = type;
    out[2] = flags;
    out[3] = 0; /* reserved */
    put_u32(out + 4, session_id);
    put_u32(out + 8, seq);
    put_u64(out + 12, time_us);
}

static void header_read(header *h, const uint8_t in[HEADER_LEN])
{
    h->version = in[0];
    h->type = in[1];
    h->flags = in[2];
    h->reserved = in[3];
    h->session_id = get_u32(in + 4);
    h->seq = get_u32(in + 8);
    h->time_us = get_u64(in + 12);
}

/* The checks that need no key: version 2, reserved byte 0, a known type, no unknown flag
 * (section 3.1, section 5 "malformed"). Whether this type may come from this sender, and
 * whether it may carry ACK_REQUESTED, is checked by the caller. */
static reason header_check(const header *h)
{
    if (h->version != PROTOCOL_VERSION || h->reserved != 0)
        return V_MALFORMED;
    if (h->type < T_HEARTBEAT || h->type > T_COOKIE)
        return V_MALFORMED;
    if (h->flags & ~FLAG_ACK_REQUESTED)
        return V_MALFORMED;
    return V_OK;
}

/* --- UDP-only registration: HELLO, COOKIE, WELCOME (section 3.5) ------------------------ */

/* HELLO (type 5), 82 to 145 bytes:
 *   header (session id 0, sequence 0) | u8 id length | device id | nonce (12)
 *   | Seal(hello key d2c, nonce, client nonce (16) | cookie (16), ad = everything before)
 * cookie is 16 zero bytes in the first HELLO. out must hold 145 bytes. Returns the length. */
static size_t hello_build(uint8_t *out, const device_keys *k, const uint8_t nonce[NONCE_LEN],
                          const uint8_t client_nonce[CLIENT_NONCE_LEN],
                          const uint8_t cookie[COOKIE_LEN], uint64_t time_us)
{
    uint8_t plain[CLIENT_NONCE_LEN + COOKIE_LEN];
    size_t n = HEADER_LEN;
    header_write(out, T_HELLO, 0, 0, 0, time_us);
    out[n++] = (uint8_t)k->id_len;
    memcpy(out + n, k->device_id, k->id_len);
    n += k->id_len;
    memcpy(out + n, nonce, NONCE_LEN);
    n += NONCE_LEN;
    memcpy(plain, client_nonce, CLIENT_NONCE_LEN);
    memcpy(plain + CLIENT_NONCE_LEN, cookie, COOKIE_LEN);
    if (aead_seal(k->hello_d2c, nonce, out, n, plain, sizeof plain, out + n) != 0)
        return 0;
    return n + sizeof plain + TAG_LEN;
}

/* COOKIE (type 8), exactly 76 bytes:
 *   header (session id 0, sequence 0) | hello nonce (12) | nonce (12)
 *   | Seal(hello key c2d, nonce, cookie (16), ad = everything before)
 * The AEAD nonce is the COOKIE's own random nonce (bytes 32..43), not the hello nonce. */
static reason cookie_open(const device_keys *k, const uint8_t *dg, size_t len,
                          const uint8_t hello_nonce[NONCE_LEN], uint8_t cookie[COOKIE_LEN])
{
    header h;
    if (len != COOKIE_DATAGRAM_LEN)
        return V_MALFORMED;
    header_read(&h, dg);
    if (header_check(&h) != V_OK || h.type != T_COOKIE || h.flags != 0 || h.session_id != 0 ||
        h.seq != 0)
        return V_MALFORMED;
    if (memcmp(dg + HEADER_LEN, hello_nonce, NONCE_LEN) != 0)
        return V_NOT_OURS;
    if (aead_open(k->hello_c2d, dg + HEADER_LEN + NONCE_LEN, dg, HEADER_LEN + 2 * NONCE_LEN,
                  dg + HEADER_LEN + 2 * NONCE_LEN, COOKIE_LEN, cookie) != 0)
        return V_BAD_TAG;
    return V_OK;
}

/* A session as the WELCOME describes it. */
typedef struct {
    uint32_t session_id;
    uint32_t heartbeat_ms, timeout_ms;
    uint16_t max_datagram;
    uint8_t key_d2c[KEY_LEN], key_c2d[KEY_LEN];
    char config[MAX_DATAGRAM + 1]; /* the configuration JSON, NUL-terminated; "" if none */
    size_t config_len;
} session;

/* WELCOME (type 6), 76 bytes plus the configuration:
 *   header (the new session id, sequence 0) | hello nonce (12) | server nonce (16)
 *   | Seal(session key c2d, nonce = session_id | 01 | 000000 | 00000000,
 *          u32 heartbeat ms | u32 timeout ms | u16 max datagram | u16 0 | config JSON or
 *          nothing, ad = everything before)
 * Derives the session keys on the way (section 1.2). */
static reason welcome_open(const device_keys *k, const uint8_t *dg, size_t len,
                           const uint8_t hello_nonce[NONCE_LEN],
                           const uint8_t client_nonce[CLIENT_NONCE_LEN], session *s)
{
    enum { AD_LEN = HEADER_LEN + NONCE_LEN + SERVER_NONCE_LEN };
    uint8_t nonce[NONCE_LEN], plain[MAX_DATAGRAM];
    size_t plain_len;
    header h;
    if (len > MAX_DATAGRAM)
        return V_TOO_LARGE;
    if (len < WELCOME_MIN_LEN)
        return V_MALFORMED;
    header_read(&h, dg);
    if (header_check(&h) != V_OK || h.type != T_WELCOME || h.flags != 0 || h.seq != 0 ||
        h.session_id == 0)
        return V_MALFORMED;
    if (memcmp(dg + HEADER_LEN, hello_nonce, NONCE_LEN) != 0)
        return V_NOT_OURS;
    memset(s, 0, sizeof *s);
    s->session_id = h.session_id;
    if (derive_session_keys(k, dg + HEADER_LEN + NONCE_LEN, client_nonce, h.session_id,
                            s->key_d2c, s->key_c2d) != 0)
        return V_BAD_TAG;
    put_u32(nonce, h.session_id);
    nonce[4] = DIR_COLLECTOR_TO_DEVICE;
    memset(nonce + 5, 0, 7); /* 000000 and sequence number 0 */
    plain_len = len - AD_LEN - TAG_LEN;
    if (aead_open(s->key_c2d, nonce, dg, AD_LEN, dg + AD_LEN, plain_len, plain) != 0)
        return V_BAD_TAG; /* "a WELCOME that does not open is not for it" */
    if (get_u16(plain + 10) != 0)
        return V_MALFORMED;
    s->heartbeat_ms = get_u32(plain);
    s->timeout_ms = get_u32(plain + 4);
    s->max_datagram = get_u16(plain + 8);
    s->config_len = plain_len - 12;
    memcpy(s->config, plain + 12, s->config_len);
    s->config[s->config_len] = '\0';
    return V_OK;
}

/* --- datagrams of a session (sections 1.3, 3.1) ---------------------------------------- */

/* nonce = u32 session_id | u8 direction | 00 00 00 | u32 seq */
static void session_nonce(uint8_t nonce[NONCE_LEN], uint32_t session_id, uint8_t direction,
                          uint32_t seq)
{
    put_u32(nonce, session_id);
    nonce[4] = direction;
    nonce[5] = nonce[6] = nonce[7] = 0;
    put_u32(nonce + 8, seq);
}

/* header | Seal(key, nonce, payload, ad = header). out must hold len + 36 bytes.
 * Returns the datagram's length, or 0 on failure. */
static size_t session_seal(uint8_t *out, const uint8_t key[KEY_LEN], uint8_t direction,
                           uint8_t type, uint8_t flags, uint32_t session_id, uint32_t seq,
                           uint64_t time_us, const uint8_t *payload, size_t len)
{
    uint8_t nonce[NONCE_LEN];
    if (len > MAX_PAYLOAD)
        return 0;
    header_write(out, type, flags, session_id, seq, time_us);
    session_nonce(nonce, session_id, direction, seq);
    if (aead_seal(key, nonce, out, HEADER_LEN, payload, len, out + HEADER_LEN) != 0)
        return 0;
    return HEADER_LEN + len + TAG_LEN;
}

/* Checks the header, then the tag (section 3.3, processing order: size, header, session,
 * tag). payload must hold len - 36 bytes. The caller checks the payload, then the window. */
static reason session_open(const uint8_t key[KEY_LEN], uint8_t direction, uint32_t session_id,
                           const uint8_t *dg, size_t len, header *h, uint8_t *payload,
                           size_t *payload_len)
{
    uint8_t nonce[NONCE_LEN];
    if (len > MAX_DATAGRAM)
        return V_TOO_LARGE;
    if (len < MIN_SESSION_DATAGRAM)
        return V_MALFORMED;
    header_read(h, dg);
    if (header_check(h) != V_OK)
        return V_MALFORMED;
    if (h->session_id != session_id)
        return V_UNKNOWN_SESSION;
    session_nonce(nonce, session_id, direction, h->seq);
    *payload_len = len - MIN_SESSION_DATAGRAM;
    if (aead_open(key, nonce, dg, HEADER_LEN, dg + HEADER_LEN, *payload_len, payload) != 0)
        return V_BAD_TAG;
    return V_OK;
}

/* --- payloads a device sends (section 3.2) ---------------------------------------------- */

/* TELEMETRY readings: u8 count (1..255), then per reading
 *   u8 name length (1..64) | name | u8 value type | value
 * Names must be unique within one datagram (the caller's job). */
typedef struct {
    uint8_t buf[MAX_PAYLOAD];
    size_t len;
    int ok; /* 0 once anything did not fit or was invalid */
} readings;

enum { V_FLOAT = 1, V_INT = 2, V_BOOL = 3, V_STRING = 4 };

static void readings_init(readings *r)
{
    r->buf[0] = 0; /* the count */
    r->len = 1;
    r->ok = 1;
}

/* Writes a reading's name and type; returns where its value goes, or NULL. */
static uint8_t *reading_begin(readings *r, const char *name, uint8_t type, size_t value_len)
{
    size_t name_len = strlen(name);
    uint8_t *p;
    if (!r->ok || r->buf[0] == 255 || !valid_name(name, name_len, 64) ||
        r->len + 1 + name_len + 1 + value_len > sizeof r->buf) {
        r->ok = 0;
        return NULL;
    }
    p = r->buf + r->len;
    *p++ = (uint8_t)name_len;
    memcpy(p, name, name_len);
    p += name_len;
    *p++ = type;
    r->len += 1 + name_len + 1 + value_len;
    r->buf[0]++;
    return p;
}

/* IEEE 754 binary64, big-endian, finite. Assumes the C double is binary64 (C99 Annex F,
 * true of every common compiler; on a part without an FPU it is still binary64). */
static void readings_add_float(readings *r, const char *name, double v)
{
    uint64_t bits;
    uint8_t *p;
    if (v != v || v > 1.7976931348623157e308 || v < -1.7976931348623157e308) {
        r->ok = 0; /* NaN or infinite: the collector would refuse the datagram */
        return;
    }
    p = reading_begin(r, name, V_FLOAT, 8);
    if (p) {
        memcpy(&bits, &v, sizeof bits);
        put_u64(p, bits);
    }
}

static void readings_add_int(readings *r, const char *name, int64_t v)
{
    uint8_t *p = reading_begin(r, name, V_INT, 8);
    if (p)
        put_u64(p, (uint64_t)v); /* two's complement */
}

static void readings_add_bool(readings *r, const char *name, int v)
{
    uint8_t *p = reading_begin(r, name, V_BOOL, 1);
    if (p)
        *p = v ? 1 : 0;
}

/* value: u8 length (0..255), then UTF-8 bytes (the caller supplies valid UTF-8) */
static void readings_add_string(readings *r, const char *name, const char *v)
{
    size_t n = strlen(v);
    uint8_t *p;
    if (n > 255) {
        r->ok = 0;
        return;
    }
    p = reading_begin(r, name, V_STRING, 1 + n);
    if (p) {
        *p = (uint8_t)n;
        memcpy(p + 1, v, n);
    }
}

/* The datagrams a device builds. Each returns the length, 0 on failure; out holds
 * MAX_DATAGRAM bytes. They are what the live device sends and what --vectors checks. */

static size_t build_heartbeat(uint8_t *out, const uint8_t key[KEY_LEN], uint32_t session_id,
                              uint32_t seq, uint8_t flags, uint64_t time_us, uint32_t uptime_s)
{
    uint8_t payload[4]; /* u32 uptime in seconds, exactly 4 bytes */
    put_u32(payload, uptime_s);
    return session_seal(out, key, DIR_DEVICE_TO_COLLECTOR, T_HEARTBEAT, flags, session_id, seq,
                        time_us, payload, sizeof payload);
}

static size_t build_telemetry(uint8_t *out, const uint8_t key[KEY_LEN], uint32_t session_id,
                              uint32_t seq, uint8_t flags, uint64_t time_us, const readings *r)
{
    if (!r->ok || r->buf[0] == 0)
        return 0;
    return session_seal(out, key, DIR_DEVICE_TO_COLLECTOR, T_TELEMETRY, flags, session_id, seq,
                        time_us, r->buf, r->len);
}

/* Writes s as a JSON string (with quotes) at out; returns the length, or 0 if it does not
 * fit. s is UTF-8; only '"', '\\' and control characters need escaping. */
static size_t json_write_string(char *out, size_t cap, const char *s)
{
    size_t n = 0;
    if (cap < 3)
        return 0;
    out[n++] = '"';
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            if (n + 2 >= cap)
                return 0;
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c < 0x20) {
            if (n + 6 >= cap)
                return 0;
            snprintf(out + n, 7, "\\u%04x", c);
            n += 6;
        } else {
            if (n + 1 >= cap)
                return 0;
            out[n++] = (char)c;
        }
    }
    if (n + 1 >= cap)
        return 0;
    out[n++] = '"';
    out[n] = '\0';
    return n;
}

/* The ACK that answers a COMMAND (section 3.4): u32 the command's sequence number, then
 *   {"id": ..., "ok": true, "result": <result_json>}   or
 *   {"id": ..., "ok": false, "error": "<error>"}
 * result_json is already JSON (e.g. {"pong":true}); error is plain text (non-empty). */
static size_t build_command_ack(uint8_t *out, const uint8_t key[KEY_LEN], uint32_t session_id,
                                uint32_t seq, uint64_t time_us, uint32_t command_seq,
                                const char *id, int ok, const char *result_json_or_error,
                                size_t max_datagram)
{
    uint8_t payload[MAX_PAYLOAD];
    char *json = (char *)payload + 4;
    size_t cap = sizeof payload - 4, n = 0, m;
    put_u32(payload, command_seq);
    m = (size_t)snprintf(json, cap, "{\"id\":");
    n += m;
    if ((m = json_write_string(json + n, cap - n, id)) == 0)
        return 0;
    n += m;
    if (ok) {
        m = (size_t)snprintf(json + n, cap - n, ",\"ok\":true,\"result\":%s}",
                             result_json_or_error);
    } else {
        m = (size_t)snprintf(json + n, cap - n, ",\"ok\":false,\"error\":");
        if (n + m < cap) {
            size_t e = json_write_string(json + n + m, cap - n - m, result_json_or_error);
            if (e == 0)
                return 0;
            m += e;
            if (n + m + 1 < cap) {
                json[n + m] = '}';
                m++;
            } else {
                return 0;
            }
        }
    }
    if (n + m >= cap || 4 + n + m + MIN_SESSION_DATAGRAM > max_datagram)
        return 0;
    n += m;
    return session_seal(out, key, DIR_DEVICE_TO_COLLECTOR, T_ACK, 0, session_id, seq, time_us,
                        payload, 4 + n);
}

/* GOODBYE: UTF-8 reason; its sequence number n says the last datagram before it had n - 1
 * (section 4.2). */
static size_t build_goodbye(uint8_t *out, const uint8_t key[KEY_LEN], uint32_t session_id,
                            uint32_t seq, uint64_t time_us, const char *reason_text)
{
    return session_seal(out, key, DIR_DEVICE_TO_COLLECTOR, T_GOODBYE, 0, session_id, seq,
                        time_us, (const uint8_t *)reason_text, strlen(reason_text));
}

/* --- the anti-replay window (section 3.3, "a device applies the same rules") ------------ */

/* The collector keeps 960 numbers; a device may keep fewer. This one keeps 64: H and the
 * 63 below it, one bit each (bit i: number H - i was accepted). */
#define WINDOW_SIZE 64

typedef struct {
    uint32_t highest; /* H: 0 at the start (0 is the WELCOME's number) */
    uint64_t seen;
} replay_window;

typedef enum { W_NEW, W_LATE, W_REPLAY } window_verdict;

static window_verdict window_check(const replay_window *w, uint32_t n)
{
    uint32_t back;
    if (n == 0)
        return W_REPLAY; /* never valid in a session */
    if (n > w->highest)
        return W_NEW;
    back = w->highest - n;
    if (back >= WINDOW_SIZE)
        return W_REPLAY; /* older than the window: it may be a replay */
    return ((w->seen >> back) & 1u) ? W_REPLAY : W_LATE;
}

/* Only after the tag verified (section 3.3: forged datagrams cannot move the window). */
static void window_accept(replay_window *w, uint32_t n)
{
    if (n > w->highest) {
        uint32_t shift = n - w->highest;
        w->seen = shift >= WINDOW_SIZE ? 0 : w->seen << shift;
        w->seen |= 1u;
        w->highest = n;
    } else if (w->highest - n < WINDOW_SIZE) {
        w->seen |= (uint64_t)1 << (w->highest - n);
    }
}

/* --- minimal JSON: read top-level string fields of an object ---------------------------- */

/* Enough for a COMMAND ({"id": ..., "name": ..., "args": {...}}): walks the top-level
 * object, skipping values it does not want (nested objects and arrays included), so that an
 * "id" inside "args" is never mistaken for the command's. It does not validate numbers or
 * literals; a firmware with a JSON library should use that instead. */

static const char *json_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int hex4(const char *p, unsigned *v)
{
    int i;
    *v = 0;
    for (i = 0; i < 4; i++) {
        char c = p[i];
        *v <<= 4;
        if (c >= '0' && c <= '9') *v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') *v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') *v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    return 0;
}

/* Parses the string at p (which is at its '"'); decodes it into out (NUL-terminated, UTF-8)
 * when out is not NULL. Returns the position after the closing quote, or NULL. */
static const char *json_string(const char *p, const char *end, char *out, size_t cap)
{
    size_t n = 0;
    if (p >= end || *p != '"')
        return NULL;
    p++;
    while (p < end && *p != '"') {
        unsigned cp;
        if ((unsigned char)*p < 0x20)
            return NULL;
        if (*p != '\\') {
            cp = (unsigned char)*p++;
            if (out) {
                if (n + 1 >= cap) return NULL;
                out[n++] = (char)cp;
            }
            continue;
        }
        if (++p >= end)
            return NULL;
        switch (*p) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if (end - p < 5 || hex4(p + 1, &cp) != 0)
                return NULL;
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* a surrogate pair */
                unsigned lo;
                if (end - p < 7 || p[1] != '\\' || p[2] != 'u' || hex4(p + 3, &lo) != 0 ||
                    lo < 0xDC00 || lo > 0xDFFF)
                    return NULL;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return NULL; /* a lone surrogate is not strict JSON (section 2.1) */
            }
            break;
        default: return NULL;
        }
        p++;
        if (out) { /* encode cp as UTF-8 */
            if (n + 4 >= cap) return NULL;
            if (cp < 0x80) {
                out[n++] = (char)cp;
            } else if (cp < 0x800) {
                out[n++] = (char)(0xC0 | (cp >> 6));
                out[n++] = (char)(0x80 | (cp & 0x3F));
            } else if (cp < 0x10000) {
                out[n++] = (char)(0xE0 | (cp >> 12));
                out[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                out[n++] = (char)(0x80 | (cp & 0x3F));
            } else {
                out[n++] = (char)(0xF0 | (cp >> 18));
                out[n++] = (char)(0x80 | ((cp >> 12) & 0x3F));
                out[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                out[n++] = (char)(0x80 | (cp & 0x3F));
            }
        }
    }
    if (p >= end)
        return NULL;
    if (out)
        out[n] = '\0';
    return p + 1;
}

/* Skips any JSON value; returns the position after it, or NULL. */
static const char *json_skip(const char *p, const char *end, int depth)
{
    p = json_ws(p, end);
    if (p >= end || depth > 32)
        return NULL;
    if (*p == '"')
        return json_string(p, end, NULL, 0);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = json_ws(p + 1, end);
        if (p < end && *p == close)
            return p + 1;
        for (;;) {
            if (close == '}') {
                p = json_string(json_ws(p, end), end, NULL, 0);
                if (!p || (p = json_ws(p, end)) >= end || *p != ':')
                    return NULL;
                p++;
            }
            if (!(p = json_skip(p, end, depth + 1)))
                return NULL;
            p = json_ws(p, end);
            if (p >= end)
                return NULL;
            if (*p == close)
                return p + 1;
            if (*p != ',')
                return NULL;
            p++;
        }
    }
    /* a number, true, false or null */
    {
        const char *start = p;
        while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t' &&
               *p != '\n' && *p != '\r')
            p++;
        return p > start ? p : NULL;
    }
}

/* Finds the top-level field `key` of the object in json[0..len) and, if it is a string,
 * decodes it into out. 0 on success, -1 if absent, not a string, or the JSON is broken. */
static int json_get_string(const char *json, size_t len, const char *key, char *out, size_t cap)
{
    const char *p = json, *end = json + len;
    char name[64];
    int found = -1;
    p = json_ws(p, end);
    if (p >= end || *p != '{')
        return -1;
    p = json_ws(p + 1, end);
    if (p < end && *p == '}')
        return -1;
    for (;;) {
        const char *after = json_string(json_ws(p, end), end, name, sizeof name);
        if (!after) { /* a key longer than ours: skip it */
            after = json_string(json_ws(p, end), end, NULL, 0);
            name[0] = '\0';
            if (!after)
                return -1;
        }
        p = json_ws(after, end);
        if (p >= end || *p != ':')
            return -1;
        p = json_ws(p + 1, end);
        if (found != 0 && strcmp(name, key) == 0 && p < end && *p == '"') {
            if (!(p = json_string(p, end, out, cap)))
                return -1;
            found = 0;
        } else if (!(p = json_skip(p, end, 1))) {
            return -1;
        }
        p = json_ws(p, end);
        if (p >= end)
            return -1;
        if (*p == '}')
            return found;
        if (*p != ',')
            return -1;
        p++;
    }
}

/* ===================================================================================== */
/* 3. Network: POSIX UDP (replace with your IP stack)                                    */
/* ===================================================================================== */

typedef struct {
    int fd;
    unsigned refused; /* ICMP "port unreachable" seen: nobody listens at the collector's port */
} udp_link;

/* Opens a UDP socket "connected" to host:port, so that the kernel only delivers datagrams
 * from that address (section 3.6: the collector answers from where we sent). */
static int udp_open(udp_link *l, const char *host, const char *port, char *err, size_t errlen)
{
    struct addrinfo hints, *res, *ai;
    int rc;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    l->fd = -1;
    l->refused = 0;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve %s:%s: %s", host, port, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        l->fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (l->fd < 0)
            continue;
        if (connect(l->fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        close(l->fd);
        l->fd = -1;
    }
    freeaddrinfo(res);
    if (l->fd < 0) {
        snprintf(err, errlen, "cannot open a UDP socket to %s:%s: %s", host, port,
                 strerror(errno));
        return -1;
    }
    return 0;
}

/* 0 on success (a lost datagram is not an error: UDP may lose it anyway). */
static int udp_send(udp_link *l, const uint8_t *buf, size_t len)
{
    for (;;) {
        ssize_t n = send(l->fd, buf, len, 0);
        if (n >= 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno == ECONNREFUSED) { /* a pending ICMP error from an earlier datagram */
            l->refused++;
            return 0;
        }
        return -1;
    }
}

/* Waits up to timeout_ms for one datagram. Returns its length, 0 on timeout, -1 on error.
 * A datagram longer than cap is truncated to cap + 1... so give cap > MAX_DATAGRAM and
 * treat anything over MAX_DATAGRAM as too large. */
static long udp_recv(udp_link *l, uint8_t *buf, size_t cap, int timeout_ms)
{
    uint64_t deadline = platform_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        struct pollfd pfd;
        uint64_t now = platform_ms();
        int wait = now >= deadline ? 0 : (int)(deadline - now);
        int rc;
        ssize_t n;
        pfd.fd = l->fd;
        pfd.events = POLLIN;
        pfd.revents = 0;
        rc = poll(&pfd, 1, wait);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0)
            return -1;
        if (rc == 0)
            return 0;
        n = recv(l->fd, buf, cap, 0);
        if (n >= 0)
            return (long)n;
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
            continue;
        if (errno == ECONNREFUSED) {
            l->refused++;
            continue;
        }
        return -1;
    }
}

static void udp_close(udp_link *l)
{
    if (l->fd >= 0)
        close(l->fd);
    l->fd = -1;
}

/* ===================================================================================== */
/* 4. The device                                                                          */
/* ===================================================================================== */

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void die(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fputs("device: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

#define COMMAND_CACHE 4 /* the ACKs of the last few commands, for retransmitted COMMANDs */

typedef struct {
    udp_link link;
    device_keys keys;
    session s;
    uint32_t last_seq;   /* the last sequence number this device used (section 3.3) */
    replay_window window; /* for the collector's datagrams */
    uint64_t started_ms, last_sent_ms;
    uint32_t awaiting_ack; /* seq of our ACK_REQUESTED datagram, 0 if none */
    int ack_arrived;
    unsigned commands_run;
    struct {
        int used;
        uint32_t command_seq;
        size_t len;
        uint8_t bytes[MAX_DATAGRAM];
    } cache[COMMAND_CACHE];
    unsigned cache_next;
} device;

/* The next sequence number: 1, 2, 3, ..., never twice (section 1.3). A device about to pass
 * 2^32 - 1 must register again; this one never sends that many. */
static uint32_t next_seq(device *d)
{
    if (d->last_seq == UINT32_MAX)
        die("sequence numbers exhausted: register again (section 1.3)");
    return ++d->last_seq;
}

static size_t max_datagram(const device *d)
{
    size_t m = d->s.max_datagram;
    return (m >= MIN_SESSION_DATAGRAM && m < MAX_DATAGRAM) ? m : MAX_DATAGRAM;
}

/* Sends a new datagram (not a retransmission): it counts for liveness (section 2.4). */
static void send_new(device *d, const uint8_t *dg, size_t len)
{
    if (len == 0 || len > max_datagram(d))
        die("could not build a datagram (%zu bytes)", len);
    if (udp_send(&d->link, dg, len) != 0)
        die("send failed: %s", strerror(errno));
    d->last_sent_ms = platform_ms();
}

static void send_heartbeat(device *d)
{
    uint8_t dg[MAX_DATAGRAM];
    uint32_t seq = next_seq(d);
    uint32_t uptime = (uint32_t)((platform_ms() - d->started_ms) / 1000u);
    send_new(d, dg, build_heartbeat(dg, d->s.key_d2c, d->s.session_id, seq, 0,
                                    platform_time_us(), uptime));
    say("HEARTBEAT sent: seq %lu, uptime %lu s", (unsigned long)seq, (unsigned long)uptime);
}

/* Runs a command and writes its outcome: the result as JSON when it returns 1, an error
 * message when it returns 0. Extend this for your device. */
static int run_command(const char *name, const char *payload_json, char *out, size_t cap)
{
    if (strcmp(name, "ping") == 0) {
        snprintf(out, cap, "{\"pong\":true}");
        return 1;
    }
    if (strcmp(name, "config") == 0) {
        /* Configuration pushed to a UDP-only device (section 3.5): args are keys to merge. */
        say("config pushed: %s", payload_json);
        snprintf(out, cap, "null");
        return 1;
    }
    snprintf(out, cap, "unknown command: %s", name);
    return 0;
}

static void handle_command(device *d, const header *h, const uint8_t *payload, size_t len)
{
    char json[MAX_DATAGRAM + 1], id[MAX_JSON_STRING], name[MAX_JSON_STRING],
        outcome[MAX_PAYLOAD];
    uint8_t dg[MAX_DATAGRAM];
    size_t n;
    uint32_t seq;
    int ok;
    memcpy(json, payload, len);
    json[len] = '\0';
    /* The window was already moved: an undecodable COMMAND is checked before (see caller). */
    json_get_string(json, len, "id", id, sizeof id);
    json_get_string(json, len, "name", name, sizeof name);
    say("COMMAND received: seq %lu, id %s, name %s", (unsigned long)h->seq, id, name);
    ok = run_command(name, json, outcome, sizeof outcome);
    seq = next_seq(d);
    n = build_command_ack(dg, d->s.key_d2c, d->s.session_id, seq, platform_time_us(), h->seq,
                          id, ok, outcome, max_datagram(d));
    if (n == 0) { /* the result did not fit: answer that instead */
        ok = 0;
        n = build_command_ack(dg, d->s.key_d2c, d->s.session_id, seq, platform_time_us(),
                              h->seq, id, 0, "result too large", max_datagram(d));
    }
    send_new(d, dg, n);
    say("ACK sent: seq %lu for command seq %lu: %s %s", (unsigned long)seq,
        (unsigned long)h->seq, ok ? "ok" : "failed", outcome);
    /* Keep the exact bytes: a retransmitted COMMAND gets them again (section 3.4). */
    d->cache[d->cache_next].used = 1;
    d->cache[d->cache_next].command_seq = h->seq;
    d->cache[d->cache_next].len = n;
    memcpy(d->cache[d->cache_next].bytes, dg, n);
    d->cache_next = (d->cache_next + 1) % COMMAND_CACHE;
    d->commands_run++;
}

/* One datagram from the collector, after registration. Returns 0, or -1 when the collector
 * ended the session (a GOODBYE datagram: kicked, shutdown). */
static int handle_datagram(device *d, const uint8_t *dg, size_t len)
{
    uint8_t payload[MAX_DATAGRAM];
    size_t plen = 0;
    header h;
    reason r;
    window_verdict v;
    unsigned i;

    if (len >= HEADER_LEN && dg[1] == T_WELCOME) {
        /* A WELCOME again: the answer to a retransmitted HELLO. We already have it. */
        say("ignored: a repeated WELCOME");
        return 0;
    }
    r = session_open(d->s.key_c2d, DIR_COLLECTOR_TO_DEVICE, d->s.session_id, dg, len, &h,
                     payload, &plen);
    if (r != V_OK) {
        say("dropped a datagram: %s", reason_name(r));
        return 0;
    }
    /* Authenticated. What the collector sends: ACK, COMMAND, GOODBYE (section 3.2); only a
     * COMMAND may ask for an ACK (section 3.1). Then the payload, then the window. */
    if ((h.type != T_ACK && h.type != T_COMMAND && h.type != T_GOODBYE) ||
        ((h.flags & FLAG_ACK_REQUESTED) && h.type != T_COMMAND) ||
        (h.type == T_ACK && plen != 4) || (h.type == T_COMMAND && plen == 0)) {
        say("dropped a datagram: malformed (type %u, %zu-byte payload)", h.type, plen);
        return 0;
    }
    if (h.type == T_COMMAND) {
        char id[MAX_JSON_STRING], name[MAX_JSON_STRING];
        if (json_get_string((const char *)payload, plen, "id", id, sizeof id) != 0 ||
            json_get_string((const char *)payload, plen, "name", name, sizeof name) != 0 ||
            id[0] == '\0' || name[0] == '\0') {
            say("dropped a COMMAND: malformed (no string id and name)");
            return 0;
        }
    }
    v = window_check(&d->window, h.seq);
    if (v == W_REPLAY) {
        if (h.type == T_COMMAND) {
            for (i = 0; i < COMMAND_CACHE; i++) {
                if (d->cache[i].used && d->cache[i].command_seq == h.seq) {
                    /* The collector did not get our ACK: the same bytes again, the command
                     * does not run twice (section 3.4). */
                    if (udp_send(&d->link, d->cache[i].bytes, d->cache[i].len) != 0)
                        die("send failed: %s", strerror(errno));
                    say("COMMAND seq %lu again: sent the same ACK again",
                        (unsigned long)h.seq);
                    return 0;
                }
            }
        }
        say("dropped a datagram: replay (seq %lu, type %u)", (unsigned long)h.seq, h.type);
        return 0;
    }
    window_accept(&d->window, h.seq);
    if (v == W_LATE)
        say("late datagram from the collector: seq %lu", (unsigned long)h.seq);

    switch (h.type) {
    case T_ACK: {
        uint32_t acked = get_u32(payload);
        say("ACK received: for seq %lu", (unsigned long)acked);
        if (d->awaiting_ack != 0 && acked == d->awaiting_ack)
            d->ack_arrived = 1;
        return 0;
    }
    case T_COMMAND:
        handle_command(d, &h, payload, plen);
        return 0;
    case T_GOODBYE:
        payload[plen] = '\0';
        say("GOODBYE received: the collector ended the session (%s)", (char *)payload);
        return -1;
    }
    return 0;
}

/* Waits until deadline_ms for datagrams, handling them, and sends a heartbeat whenever the
 * device has sent nothing for a heartbeat interval (section 2.4). Returns after one
 * datagram or at the deadline: 0, or -1 when the collector ended the session. */
static int pump(device *d, uint64_t deadline_ms)
{
    uint8_t buf[MAX_DATAGRAM + 1];
    uint64_t now = platform_ms(), wake = deadline_ms;
    long n;
    if (d->s.heartbeat_ms > 0) {
        if (now >= d->last_sent_ms + d->s.heartbeat_ms)
            send_heartbeat(d);
        if (d->last_sent_ms + d->s.heartbeat_ms < wake)
            wake = d->last_sent_ms + d->s.heartbeat_ms;
    }
    now = platform_ms();
    n = udp_recv(&d->link, buf, sizeof buf, wake > now ? (int)(wake - now) : 0);
    if (n < 0)
        die("receive failed: %s", strerror(errno));
    if (n > MAX_DATAGRAM) {
        say("dropped a datagram: too_large");
        return 0;
    }
    return n > 0 ? handle_datagram(d, buf, (size_t)n) : 0;
}

/* --- registration (section 3.5) --------------------------------------------------------- */

typedef enum { GOT_NOTHING, GOT_COOKIE, GOT_WELCOME } hello_outcome;

/* Sends one HELLO and retransmits the same bytes after 1 s, 2 s, 4 s, ... (5 sends), until a
 * COOKIE or WELCOME answers this HELLO's nonce. */
static hello_outcome hello_exchange(device *d, const uint8_t *hello, size_t len,
                                    const uint8_t nonce[NONCE_LEN],
                                    const uint8_t client_nonce[CLIENT_NONCE_LEN],
                                    uint8_t cookie[COOKIE_LEN])
{
    uint8_t buf[MAX_DATAGRAM + 1];
    unsigned attempt, wait_ms = 1000;
    for (attempt = 1; attempt <= 5; attempt++, wait_ms *= 2) {
        uint64_t deadline;
        if (udp_send(&d->link, hello, len) != 0)
            die("send failed: %s", strerror(errno));
        if (attempt > 1)
            say("HELLO retransmitted (attempt %u)", attempt);
        deadline = platform_ms() + wait_ms;
        for (;;) {
            uint64_t now = platform_ms();
            long n;
            reason r;
            if (now >= deadline)
                break;
            n = udp_recv(&d->link, buf, sizeof buf, (int)(deadline - now));
            if (n < 0)
                die("receive failed: %s", strerror(errno));
            if (n == 0)
                break;
            if (n < HEADER_LEN || n > MAX_DATAGRAM) {
                say("ignored a datagram of %ld bytes", n);
                continue;
            }
            if (buf[1] == T_COOKIE) {
                r = cookie_open(&d->keys, buf, (size_t)n, nonce, cookie);
                if (r == V_OK)
                    return GOT_COOKIE;
            } else if (buf[1] == T_WELCOME) {
                r = welcome_open(&d->keys, buf, (size_t)n, nonce, client_nonce, &d->s);
                if (r == V_OK)
                    return GOT_WELCOME;
            } else {
                r = V_MALFORMED;
            }
            say("ignored a datagram (type %u): %s", buf[1], reason_name(r));
        }
    }
    return GOT_NOTHING;
}

static void do_register(device *d)
{
    uint8_t client_nonce[CLIENT_NONCE_LEN], cookie[COOKIE_LEN], nonce[NONCE_LEN];
    uint8_t hello[HEADER_LEN + 1 + MAX_DEVICE_ID + NONCE_LEN + 48];
    unsigned round;
    memset(cookie, 0, sizeof cookie); /* the first HELLO: no cookie */
    /* Fresh per registration, repeated in the second HELLO (the cookie is bound to it). */
    if (platform_random(client_nonce, sizeof client_nonce) != 0)
        die("no random source");
    /* A COOKIE in answer to a HELLO with a cookie means the cookie expired (or the address
     * changed, or the collector restarted): try again with the new one, a few times. */
    for (round = 0; round < 4; round++) {
        size_t len;
        hello_outcome got;
        if (platform_random(nonce, sizeof nonce) != 0) /* fresh in every new HELLO */
            die("no random source");
        len = hello_build(hello, &d->keys, nonce, client_nonce, cookie, platform_time_us());
        if (len == 0)
            die("could not seal the HELLO");
        say("HELLO sent: %s", round == 0 ? "no cookie" : "with the cookie");
        got = hello_exchange(d, hello, len, nonce, client_nonce, cookie);
        if (got == GOT_NOTHING)
            die("no answer to the HELLO after 5 sends (31 s)%s",
                d->link.refused ? ": the collector's port is unreachable (is it running?)"
                                : "");
        if (got == GOT_WELCOME)
            return;
        say("COOKIE received");
    }
    die("the collector keeps answering with a COOKIE");
}

/* --- sending readings (sections 3.2, 3.4) ------------------------------------------------ */

/* Retransmits the same bytes until the ACK arrives: 0.25 s after the first send, then
 * 0.5 s, 1 s and 2 s, and 2 s after each further one, 6 sends in all (section 3.4). */
static void await_ack(device *d, const uint8_t *dg, size_t len, uint32_t seq)
{
    unsigned sends = 1, wait_ms = 250;
    uint64_t deadline = platform_ms() + wait_ms;
    d->awaiting_ack = seq;
    d->ack_arrived = 0;
    while (!d->ack_arrived) {
        if (platform_ms() >= deadline) {
            if (sends == 6)
                die("no ACK for seq %lu after 6 sends: the session is gone, register again "
                    "(section 4.1)",
                    (unsigned long)seq);
            if (udp_send(&d->link, dg, len) != 0)
                die("send failed: %s", strerror(errno));
            sends++;
            if (wait_ms < 2000)
                wait_ms *= 2;
            deadline = platform_ms() + wait_ms;
            say("seq %lu retransmitted (send %u)", (unsigned long)seq, sends);
        }
        if (pump(d, deadline) != 0)
            die("the session ended while waiting for an ACK");
    }
    d->awaiting_ack = 0;
}

static void send_readings(device *d, unsigned count, unsigned interval_ms)
{
    unsigned i;
    for (i = 1; i <= count; i++) {
        uint8_t dg[MAX_DATAGRAM];
        readings r;
        double temperature = 20.0 + 0.25 * i;
        int door_open = (i % 2) == 0;
        int last = i == count;
        uint32_t seq = next_seq(d);
        size_t len;
        readings_init(&r);
        readings_add_float(&r, "temperature", temperature);
        readings_add_int(&r, "count", (int64_t)i);
        readings_add_bool(&r, "door_open", door_open);
        len = build_telemetry(dg, d->s.key_d2c, d->s.session_id, seq,
                              last ? FLAG_ACK_REQUESTED : 0, platform_time_us(), &r);
        send_new(d, dg, len);
        say("TELEMETRY sent: seq %lu, temperature=%.2f count=%u door_open=%s%s",
            (unsigned long)seq, temperature, i, door_open ? "true" : "false",
            last ? ", ACK requested" : "");
        if (last) {
            await_ack(d, dg, len, seq);
        } else {
            uint64_t until = platform_ms() + interval_ms;
            while (platform_ms() < until)
                if (pump(d, until) != 0)
                    die("the session ended while sending readings");
        }
    }
}

/* --- the self-test: section 6 ------------------------------------------------------------ */

static size_t from_hex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;
    while (*hex) {
        unsigned v;
        char pair[3];
        if (*hex == ' ' || *hex == '\n') {
            hex++;
            continue;
        }
        if (!hex[1] || n >= cap)
            return 0;
        pair[0] = hex[0];
        pair[1] = hex[1];
        pair[2] = '\0';
        if (sscanf(pair, "%2x", &v) != 1)
            return 0;
        out[n++] = (uint8_t)v;
        hex += 2;
    }
    return n;
}

static int g_failures;

static void check_bytes(const char *what, const uint8_t *got, size_t got_len,
                        const char *expected_hex)
{
    uint8_t expected[MAX_DATAGRAM];
    size_t n = from_hex(expected_hex, expected, sizeof expected);
    if (n == got_len && memcmp(got, expected, n) == 0) {
        say("ok    %s", what);
    } else {
        char hex[2 * MAX_DATAGRAM + 1];
        to_hex(got, got_len, hex);
        say("FAIL  %s\n      got      %s\n      expected %s", what, hex, expected_hex);
        g_failures++;
    }
}

static void check(const char *what, int cond)
{
    say(cond ? "ok    %s" : "FAIL  %s", what);
    if (!cond)
        g_failures++;
}

/* The fixed inputs of section 6. */
#define V_SECRET "correct horse battery staple"
#define V_DEVICE "greenhouse-1"
#define V_NONCE "00112233445566778899aabbccddeeff"
#define V_CNONCE "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
#define V_SESSION 1592590337u /* 0x5eed0001 */
#define V_TIME 1767225600000000ull /* 2026-01-01T00:00:00Z */
#define V_HELLO_NONCE_1 "4849204e4f4e43452d313a29" /* "HI NONCE-1:)" */
#define V_HELLO_NONCE_2 "4849204e4f4e43452d323a29" /* "HI NONCE-2:)" */

/* The expected hex, copied from docs/PROTOCOL.md section 6. */
static const char X_AUTH[] = "0b5be6fb20031ab749ca6c213229ddbd9c361a47aff15a9152b56787c2b37337";
static const char X_HELLO_D2C[] =
    "d524d339ef76f79df07eab38b790c2294326c5994e31e2d3184b8c0924191765";
static const char X_HELLO_C2D[] =
    "9eac2f974a7b6b747b8234a71c1ba4caeb5283ee0ae7dd4e4a8ca36546b4fb98";
static const char X_PROOF[] = "f38113d5c6789c03f1ce41f5616b3c4c3ac0cd109a355a9968c9f38b7e02d8c3";
static const char X_SESSION_D2C[] =
    "25ed7a4c6c595b0af5dfbdda3af249d3c9313af34a4842196689e497a5f30f49";
static const char X_SESSION_C2D[] =
    "27881e588d99a21f5443162a37d87336577c7cf4db15633acf897f4f84ae2e4d";
static const char X_HELLO[] =
    "02050000 00000000 00000000 00064748 46204000 0c677265 656e686f 7573652d"
    "31484920 4e4f4e43 452d313a 29c2aef1 37d7ade6 be845f17 8eedfd02 d7ec9657"
    "4b060d9c 6109ad55 158f49e2 a9b573c5 6c62da83 ca269e30 29f8b23a 49";
static const char X_COOKIE[] =
    "02080000 00000000 00000000 00064748 46204000 4849204e 4f4e4345 2d313a29"
    "434f4f4b 4945204e 4f4e4345 944cdc3b 94cb9a63 e586f31e ddc03426 16931820"
    "1c86e075 424c3ee4 c88ade33";
static const char X_HELLO_WITH_COOKIE[] =
    "02050000 00000000 00000000 00064748 46204000 0c677265 656e686f 7573652d"
    "31484920 4e4f4e43 452d323a 291c498a f6f7bac6 3d87d9f9 4b12d980 03d61e57"
    "7b01ea35 910123b2 6f8739ef d689b1ad 884cbb4e 8f6426c8 3e357bdf 0a";
static const char X_WELCOME[] =
    "02060000 5eed0001 00000000 00064748 46204000 4849204e 4f4e4345 2d323a29"
    "00112233 44556677 8899aabb ccddeeff a176ac11 7aaa5e61 a0264488 617d13b8"
    "917e8ca6 4fc4a44e 7939dc82 072f1c51 74e23970 f1a1b4bc e1cf01eb dff679f7"
    "09703c";
static const char X_HEARTBEAT[] =
    "02010000 5eed0001 00000001 00064748 46204000 7aaf9f28 0bafea24 ed8cbbbe"
    "1bb1ecf3 979bb0df";
static const char X_HEARTBEAT_ACK_REQUESTED[] =
    "02010100 5eed0001 00000002 00064748 46204000 15d43c0d 0e6066f1 8971d8a0"
    "8de80b41 7b2c0cb8";
static const char X_TELEMETRY[] =
    "02020000 5eed0001 00000003 00064748 46204000 78baea52 999ad2cf 4daf268a"
    "a76f016d 352d1446 0bcf0c8c 30c3a065 38e8747e da49f11f ea132c44 bfcad056"
    "32657a97 6915abd7 db0d3e16 1453ee1a 20df7e8c 78240196 16714826 cc06cb0b";
static const char X_ACK_FROM_COLLECTOR[] =
    "02030000 5eed0001 00000001 00064748 46204000 71f4b8aa 6a2c6643 fd4ed0c5"
    "24dc0507 91cc4fd5";
static const char X_COMMAND[] =
    "02040100 5eed0001 00000002 00064748 46204000 2bb93fe6 8455ffa3 eb3fa18f"
    "6775f167 acbebbce fc5c338e 3bc651f9 bd78065f 0a992660 feefa5b3 caa0484f"
    "1d606677 b7b8a8e0 3cbd66d8 e25d02c3 7a7a89df 495b981f";
static const char X_ACK_WITH_RESULT[] =
    "02030000 5eed0001 00000004 00064748 46204000 16081c92 6d6fcf31 722d7b16"
    "efe64b30 b39b90f7 6728d030 1166d89b 67d601a3 2390cfaa f7413181 7f77d305"
    "148dd845 439d95ac db25ebb8 f240274d 1e952db8 0536d030";
static const char X_GOODBYE[] =
    "02070000 5eed0001 00000005 00064748 46204000 b8b9fd06 2e16d4be c1bab2e1"
    "71bdf96e f8137e31 3109";

static int self_test(void)
{
    device_keys k;
    session s;
    uint8_t nonce[16], cnonce[16], hn1[12], hn2[12], cookie[16], zero_cookie[16] = {0};
    uint8_t d2c[32], c2d[32], dg[MAX_DATAGRAM], expected[MAX_DATAGRAM], payload[MAX_DATAGRAM];
    char proof[65], id[MAX_JSON_STRING], name[MAX_JSON_STRING];
    size_t n, plen;
    header h;
    readings r;
    replay_window w;

    from_hex(V_NONCE, nonce, sizeof nonce);
    from_hex(V_CNONCE, cnonce, sizeof cnonce);
    from_hex(V_HELLO_NONCE_1, hn1, sizeof hn1);
    from_hex(V_HELLO_NONCE_2, hn2, sizeof hn2);

    say("section 6 test vectors:");
    /* vector: keys */
    check("keys: device id is valid", derive_device_keys(&k, V_DEVICE, V_SECRET) == 0);
    check_bytes("keys: auth_key", k.auth_key, 32, X_AUTH);
    check_bytes("keys: hello_d2c", k.hello_d2c, 32, X_HELLO_D2C);
    check_bytes("keys: hello_c2d", k.hello_c2d, 32, X_HELLO_C2D);
    check("keys: proof computed", registration_proof(&k, V_NONCE, V_CNONCE, proof) == 0);
    check("keys: proof", strcmp(proof, X_PROOF) == 0);
    check("keys: session keys derived",
          derive_session_keys(&k, nonce, cnonce, V_SESSION, d2c, c2d) == 0);
    check_bytes("keys: session_d2c", d2c, 32, X_SESSION_D2C);
    check_bytes("keys: session_c2d", c2d, 32, X_SESSION_C2D);

    /* vector: hello (built as the device builds it) */
    n = hello_build(dg, &k, hn1, cnonce, zero_cookie, V_TIME);
    check_bytes("hello", dg, n, X_HELLO);

    /* vector: cookie (opened as the device opens it) */
    n = from_hex(X_COOKIE, expected, sizeof expected);
    check("cookie: opens", cookie_open(&k, expected, n, hn1, cookie) == V_OK);
    check_bytes("cookie: the cookie", cookie, 16, "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf");
    check("cookie: refused for another HELLO", cookie_open(&k, expected, n, hn2, cookie) ==
                                                   V_NOT_OURS);
    expected[50] ^= 1;
    check("cookie: a flipped bit is bad_tag", cookie_open(&k, expected, n, hn1, cookie) ==
                                                  V_BAD_TAG);

    /* vector: hello-with-cookie */
    from_hex("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf", cookie, sizeof cookie);
    n = hello_build(dg, &k, hn2, cnonce, cookie, V_TIME);
    check_bytes("hello-with-cookie", dg, n, X_HELLO_WITH_COOKIE);

    /* vector: welcome */
    n = from_hex(X_WELCOME, expected, sizeof expected);
    check("welcome: opens", welcome_open(&k, expected, n, hn2, cnonce, &s) == V_OK);
    check("welcome: session id 1592590337", s.session_id == V_SESSION);
    check("welcome: heartbeat 5000 ms, timeout 15000 ms, max datagram 1200",
          s.heartbeat_ms == 5000 && s.timeout_ms == 15000 && s.max_datagram == 1200);
    check("welcome: config {\"report_interval\":1.0}",
          strcmp(s.config, "{\"report_interval\":1.0}") == 0);
    check_bytes("welcome: session key d2c", s.key_d2c, 32, X_SESSION_D2C);

    /* vectors: heartbeat, heartbeat-ack-requested */
    n = build_heartbeat(dg, d2c, V_SESSION, 1, 0, V_TIME, 3600);
    check_bytes("heartbeat", dg, n, X_HEARTBEAT);
    n = build_heartbeat(dg, d2c, V_SESSION, 2, FLAG_ACK_REQUESTED, V_TIME, 3601);
    check_bytes("heartbeat-ack-requested", dg, n, X_HEARTBEAT_ACK_REQUESTED);

    /* vector: telemetry */
    readings_init(&r);
    readings_add_float(&r, "temperature", 21.5);
    readings_add_int(&r, "count", 42);
    readings_add_bool(&r, "door_open", 0);
    readings_add_string(&r, "status", "ok");
    n = build_telemetry(dg, d2c, V_SESSION, 3, 0, V_TIME, &r);
    check_bytes("telemetry", dg, n, X_TELEMETRY);

    /* vector: ack-from-collector (opened as the device opens it) */
    n = from_hex(X_ACK_FROM_COLLECTOR, expected, sizeof expected);
    check("ack-from-collector: opens",
          session_open(c2d, DIR_COLLECTOR_TO_DEVICE, V_SESSION, expected, n, &h, payload,
                       &plen) == V_OK);
    check("ack-from-collector: ACK seq 1, acked_seq 2",
          h.type == T_ACK && h.seq == 1 && plen == 4 && get_u32(payload) == 2);

    /* vector: command */
    n = from_hex(X_COMMAND, expected, sizeof expected);
    check("command: opens",
          session_open(c2d, DIR_COLLECTOR_TO_DEVICE, V_SESSION, expected, n, &h, payload,
                       &plen) == V_OK);
    check("command: COMMAND seq 2, ACK_REQUESTED",
          h.type == T_COMMAND && h.seq == 2 && h.flags == FLAG_ACK_REQUESTED);
    check("command: id c000001, name set_rate",
          json_get_string((char *)payload, plen, "id", id, sizeof id) == 0 &&
              json_get_string((char *)payload, plen, "name", name, sizeof name) == 0 &&
              strcmp(id, "c000001") == 0 && strcmp(name, "set_rate") == 0);
    check("command: does not open with the other direction's key",
          session_open(d2c, DIR_COLLECTOR_TO_DEVICE, V_SESSION, expected, n, &h, payload,
                       &plen) == V_BAD_TAG);

    /* vector: ack-with-result (the device's answer to that command) */
    n = build_command_ack(dg, d2c, V_SESSION, 4, V_TIME, 2, "c000001", 1, "{\"rate\":2.0}",
                          MAX_DATAGRAM);
    check_bytes("ack-with-result", dg, n, X_ACK_WITH_RESULT);

    /* vector: goodbye */
    n = build_goodbye(dg, d2c, V_SESSION, 5, V_TIME, "closed");
    check_bytes("goodbye", dg, n, X_GOODBYE);

    /* Not a vector of the document: the window rules of section 3.3, on this device's
     * window, and the minimal JSON reader. */
    say("anti-replay window (section 3.3) and JSON:");
    memset(&w, 0, sizeof w);
    check("window: 0 is never valid", window_check(&w, 0) == W_REPLAY);
    window_accept(&w, 1);
    window_accept(&w, 2);
    window_accept(&w, 5);
    check("window: 3 after 5 is late, accepted", window_check(&w, 3) == W_LATE);
    window_accept(&w, 3);
    check("window: 3 again is a replay", window_check(&w, 3) == W_REPLAY);
    check("window: 6 is new", window_check(&w, 6) == W_NEW);
    window_accept(&w, 100);
    check("window: 4, far below the window, is a replay", window_check(&w, 4) == W_REPLAY);
    check("window: 40 (unseen, in the window) is late", window_check(&w, 40) == W_LATE);
    {
        static const char cmd[] = "{\"args\":{\"id\":\"no\",\"name\":[1,{\"x\":\"}\"}]},"
                                  "\"name\" : \"p\\u00e9\\\"ng\", \"id\":\"c\\/1\"}";
        check("json: top-level fields only, escapes decoded",
              json_get_string(cmd, strlen(cmd), "id", id, sizeof id) == 0 &&
                  json_get_string(cmd, strlen(cmd), "name", name, sizeof name) == 0 &&
                  strcmp(id, "c/1") == 0 && strcmp(name, "p\xc3\xa9\"ng") == 0);
    }

    if (g_failures) {
        fprintf(stderr, "device: error: %d self-test check(s) failed\n", g_failures);
        return 1;
    }
    say("all test vectors match");
    return 0;
}

/* --- main ---------------------------------------------------------------------------- */

static void usage(FILE *to, int status)
{
    fputs("usage: device [options] HOST UDP_PORT DEVICE_ID SECRET [READINGS]\n"
          "       device --vectors\n"
          "\n"
          "Registers over UDP with the collector at HOST:UDP_PORT, sends READINGS (default 5)\n"
          "TELEMETRY datagrams, answers one COMMAND, and says GOODBYE.\n"
          "\n"
          "options:\n"
          "  --interval MS      pause between readings (default 200)\n"
          "  --wait-command S   how long to wait for a COMMAND (default 10; 0: do not wait)\n"
          "  --linger MS        after the command, how long to keep answering a retransmitted\n"
          "                     COMMAND before the GOODBYE (default 1000)\n"
          "  --vectors          check the test vectors of docs/PROTOCOL.md section 6, and exit\n"
          "  --help             show this help, and exit\n"
          "\n"
          "exit status: 0 done, 1 the collector did not answer or ended the session,\n"
          "2 bad arguments\n",
          to);
    exit(status);
}

static unsigned long parse_number(const char *s, unsigned long max, const char *what)
{
    char *end;
    unsigned long v;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || *s == '-' || v > max) {
        fprintf(stderr, "device: error: bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    static device d; /* static: it holds a few kilobytes of buffers */
    const char *positional[5];
    unsigned npos = 0, readings_count = 5, interval_ms = 200, wait_s = 10, linger_ms = 1000;
    char err[256];
    int i;
    uint64_t deadline;

    setvbuf(stdout, NULL, _IOLBF, 0);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--vectors") == 0)
            return self_test();
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
            usage(stdout, 0);
        if (strcmp(a, "--interval") == 0 && i + 1 < argc)
            interval_ms = (unsigned)parse_number(argv[++i], 600000, "--interval");
        else if (strcmp(a, "--wait-command") == 0 && i + 1 < argc)
            wait_s = (unsigned)parse_number(argv[++i], 86400, "--wait-command");
        else if (strcmp(a, "--linger") == 0 && i + 1 < argc)
            linger_ms = (unsigned)parse_number(argv[++i], 600000, "--linger");
        else if (a[0] == '-' && a[1] == '-')
            usage(stderr, 2);
        else if (npos < 5)
            positional[npos++] = a;
        else
            usage(stderr, 2);
    }
    if (npos < 4)
        usage(stderr, 2);
    if (npos == 5)
        readings_count = (unsigned)parse_number(positional[4], 100000, "READINGS");
    parse_number(positional[1], 65535, "UDP_PORT");

    memset(&d, 0, sizeof d);
    if (derive_device_keys(&d.keys, positional[2], positional[3]) != 0)
        die("bad device id %s: 1 to 64 of A-Z a-z 0-9 _ . : - (section 1.2)", positional[2]);
    if (udp_open(&d.link, positional[0], positional[1], err, sizeof err) != 0)
        die("%s", err);
    d.started_ms = platform_ms();
    say("device %s: collector at %s:%s (UDP)", d.keys.device_id, positional[0], positional[1]);

    /* 1. Register (section 3.5). */
    do_register(&d);
    d.last_seq = 0;       /* sequence numbers from 1 (section 3.3) */
    d.last_sent_ms = platform_ms();
    memset(&d.window, 0, sizeof d.window); /* the WELCOME was the collector's 0 */
    say("WELCOME received: session %lu, heartbeat %lu ms, timeout %lu ms, max datagram %u",
        (unsigned long)d.s.session_id, (unsigned long)d.s.heartbeat_ms,
        (unsigned long)d.s.timeout_ms, (unsigned)d.s.max_datagram);
    say("config: %s", d.s.config_len ? d.s.config : "(none)");

    /* 2. Readings; an ACK for the last one. */
    if (readings_count > 0)
        send_readings(&d, readings_count, interval_ms);

    /* 3. A command, if one comes. */
    if (wait_s > 0) {
        say("waiting up to %u s for a COMMAND", wait_s);
        deadline = platform_ms() + (uint64_t)wait_s * 1000u;
        while (d.commands_run == 0) {
            if (platform_ms() >= deadline)
                die("no COMMAND within %u s", wait_s);
            if (pump(&d, deadline) != 0)
                die("the session ended while waiting for a COMMAND");
        }
        /* Our ACK may be lost: the collector then sends the COMMAND again (0.5 s later). */
        deadline = platform_ms() + linger_ms;
        while (platform_ms() < deadline)
            if (pump(&d, deadline) != 0)
                die("the session ended after the command");
    }

    /* 4. GOODBYE: its sequence number tells the collector how far we got (section 4.2). */
    {
        uint8_t dg[MAX_DATAGRAM];
        uint32_t seq = next_seq(&d);
        send_new(&d, dg, build_goodbye(dg, d.s.key_d2c, d.s.session_id, seq,
                                       platform_time_us(), "closed"));
        say("GOODBYE sent: seq %lu (closed)", (unsigned long)seq);
    }
    udp_close(&d.link);
    say("done");
    return 0;
}

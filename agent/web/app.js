// voice-agent kiosk: gate state, live partials and finals, push-to-talk, and an events log.
// Plain browser JavaScript, no build step. The page's own ?token= is passed on to every
// request, since browsers cannot put an X-API-Key header on WebSocket handshakes.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const RATE = 16000; // what /ws/asr expects: s16le mono 16 kHz
const FRAME_SAMPLES = 1600; // 100 ms per WebSocket frame
const MAX_LOG = 200;
const FINAL_TIMEOUT_MS = 30000;
// The /ws/events snapshot comes once, at connect: health is polled to keep the banner current.
const HEALTH_POLL_MS = 3000;
const $ = (id) => document.getElementById(id);

function wsUrl(path, params = {}) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (TOKEN) url.searchParams.set("token", TOKEN);
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  return url.toString();
}

function assetUrl(path) {
  return TOKEN ? `${path}?token=${encodeURIComponent(TOKEN)}` : path;
}

// ---- page updates -------------------------------------------------------------------------

function logEvent(kind, text) {
  const li = document.createElement("li");
  li.className = kind.replace(/\./g, "-");
  li.textContent = `${new Date().toLocaleTimeString()}  ${kind}  ${text}`;
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_LOG) list.lastChild.remove();
}

function hint(text, isError = false) {
  const h = $("hint");
  h.textContent = text;
  h.classList.toggle("error", isError);
}

function setConn(on, text) {
  const c = $("conn");
  c.textContent = text;
  c.className = "badge " + (on ? "on" : "off");
}

function setGate(gate) {
  const g = $("gate");
  g.textContent = `gate ${gate.state} (${gate.mode})`;
  g.className = "badge " + gate.state;
  g.dataset.state = gate.state;
}

function showPartial(text) {
  $("partial").textContent = text || "";
}

function setStatus(health) {
  const s = $("status");
  s.textContent = health.status;
  s.className = "badge " + health.status;
  s.dataset.status = health.status;
  s.title = (health.problems || []).join("\n") || "the daemon's health";
}

function setAudio(audio) {
  // The daemon's own input: a banner says why it does not work, and push-to-talk on it is
  // off until it does. The browser's microphone does not depend on it.
  const ok = audio.state === "ok";
  const banner = $("audio-banner");
  banner.hidden = ok;
  banner.dataset.state = audio.state;
  if (!ok) {
    const retry = audio.retry_in_s ? ` (retrying in ${audio.retry_in_s} s)` : "";
    const why = audio.reason ? `: ${audio.reason}` : "";
    banner.textContent = `The daemon's microphone is ${audio.state}${why}${retry}. ` +
      "This device's microphone still works.";
  }
  const mic = $("mic");
  const daemon = mic.querySelector('option[value="daemon"]');
  daemon.disabled = !ok;
  if (!ok && mic.value === "daemon" && !pressed) {
    mic.value = "browser";
    hint("the daemon's microphone is unavailable: using this device's", true);
  }
}

function applyHealth(h) {
  setStatus(h);
  if (h.audio) setAudio(h.audio);
}

let healthTimer = null;

async function pollHealth() {
  clearTimeout(healthTimer);
  try {
    const r = await fetch(assetUrl("/api/health"), { cache: "no-store" });
    if (r.ok) applyHealth(await r.json());
  } catch (err) {
    // The events socket reports the lost connection; keep polling.
  }
  healthTimer = setTimeout(pollHealth, HEALTH_POLL_MS);
}

function addFinal(text, meta, data = {}) {
  const li = document.createElement("li");
  for (const [k, v] of Object.entries(data)) {
    if (v !== undefined && v !== null) li.dataset[k] = String(v);
  }
  const t = document.createElement("span");
  t.className = "text";
  t.textContent = text || "(nothing recognised)";
  const m = document.createElement("span");
  m.className = "meta";
  m.textContent = meta;
  li.append(t, m);
  $("finals").prepend(li);
  if (data.utteranceId) flushNotes(data.utteranceId);
  showPartial("");
}

// Speaker, emotion and access events follow their utterance's final: they are added to its
// line (found by utterance_id); one that comes first waits for the final, briefly.
const pendingNotes = new Map();

function annotate(utteranceId, kind, text) {
  if (!utteranceId) return;
  const li = document.querySelector(`#finals li[data-utterance-id="${CSS.escape(utteranceId)}"]`);
  if (!li) {
    const notes = pendingNotes.get(utteranceId) || [];
    notes.push([kind, text]);
    pendingNotes.set(utteranceId, notes);
    setTimeout(() => pendingNotes.delete(utteranceId), 10000);
    return;
  }
  let tag = li.querySelector(`.note.${kind}`);
  if (!tag) {
    tag = document.createElement("span");
    tag.className = `note ${kind}`;
    li.append(tag);
  }
  tag.textContent = text;
}

function flushNotes(utteranceId) {
  for (const [kind, text] of pendingNotes.get(utteranceId) || []) annotate(utteranceId, kind, text);
  pendingNotes.delete(utteranceId);
}

// The reply's text, streamed from llm.text and settled by llm.done.
function showReply(replyId, text, streaming) {
  const box = $("reply");
  if (box.dataset.replyId !== replyId) {
    box.dataset.replyId = replyId;
    box.textContent = "";
  }
  box.hidden = false;
  box.textContent = streaming ? box.textContent + text : text;
  box.classList.toggle("streaming", streaming);
}

function finalMeta(source, ms, ev) {
  const parts = [source, new Date().toLocaleTimeString()];
  if (typeof ev.audio_s === "number") parts.push(`${ev.audio_s.toFixed(2)} s of audio`);
  if (ms !== undefined && ms !== null) parts.push(`${Math.round(ms)} ms after release`);
  return parts.join(" · ");
}

// ---- /ws/events: snapshot, live events, gate commands ---------------------------------------

class EventsSocket {
  constructor() {
    this.ws = null;
    this.backoff = 500;
  }

  connect() {
    const ws = new WebSocket(wsUrl("/ws/events"));
    this.ws = ws;
    ws.onopen = () => {
      this.backoff = 500;
      setConn(true, "connected");
    };
    ws.onmessage = (m) => this.onEvent(JSON.parse(m.data));
    ws.onclose = (e) => {
      setConn(false, e.code === 1006 ? "disconnected" : `disconnected: ${e.reason || e.code}`);
      // Reconnect with backoff: the daemon may be restarting.
      setTimeout(() => this.connect(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, 10000);
    };
  }

  send(obj) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(obj));
      return true;
    }
    hint("not connected to the daemon", true);
    return false;
  }

  onEvent(ev) {
    switch (ev.type) {
      case "snapshot":
        $("device").textContent = `${ev.device_id} · ${ev.version}`;
        setGate(ev.gate);
        applyHealth(ev);
        logEvent("snapshot", `gate ${ev.gate.state}, asr ${ev.models.asr || "none"}`);
        return;
      case "state.changed":
        setGate({ state: ev.state, mode: ev.mode });
        logEvent(ev.type, `${ev.previous} -> ${ev.state} (${ev.reason})`);
        return;
      case "asr.partial":
        showPartial(ev.text);
        return; // partials are frequent: shown live, not logged
      case "asr.final":
        addFinal(ev.text, finalMeta("daemon microphone", ev.eos_to_final_ms, ev),
                 { audioS: ev.audio_s, source: "daemon", utteranceId: ev.utterance_id });
        logEvent(ev.type, ev.text);
        return;
      case "speaker.identified": {
        const who = ev.is_match ? ev.name : `unknown${ev.reason ? ` (${ev.reason})` : ""}`;
        annotate(ev.utterance_id, "speaker", `speaker ${who} ${ev.score.toFixed(2)}`);
        logEvent(ev.type, `${who}, score ${ev.score.toFixed(2)}`);
        return;
      }
      case "access.denied":
        annotate(ev.utterance_id, "access", `${ev.action} refused: ${ev.reason}`);
        logEvent(ev.type, `${ev.action} refused for ${ev.name}: ${ev.reason}`);
        return;
      case "emotion.detected":
        annotate(ev.utterance_id, "emotion",
                 `${ev.label} ${Math.round(ev.confidence * 100)} %`);
        logEvent(ev.type, `${ev.label} (${Math.round(ev.confidence * 100)} %)`);
        return;
      case "emotion.session":
        $("mood").hidden = false;
        $("mood").textContent = `mood: ${ev.dominant || "?"} over ${ev.utterances} ` +
          `utterances · valence ${Math.round(ev.valence)}/100`;
        logEvent(ev.type, `${ev.dominant || "?"} over ${ev.utterances}`);
        return;
      case "llm.text":
        showReply(ev.reply_id, ev.text, true);
        return; // streamed pieces: shown live, not logged
      case "llm.done":
        showReply(ev.reply_id, ev.text, false);
        logEvent(ev.type, ev.text);
        return;
      case "reply.cancelled":
        logEvent(ev.type, ev.reason);
        return;
      case "cloud.unavailable":
        logEvent(ev.type, `${ev.service}/${ev.code}: ${ev.message}`);
        return;
      case "error":
        logEvent("error", `${ev.stage || "api"}/${ev.code}: ${ev.message}`);
        if (ev.stage === "audio") pollHealth(); // the input changed: show it now
        return;
      case "command.result":
        logEvent(ev.type, `${ev.command}: gate ${ev.gate.state}`);
        return;
      default:
        logEvent(ev.type, ev.utterance_id ? `utterance ${ev.utterance_id}` : "");
    }
  }
}

// ---- the browser's microphone, kept open while the page is visible --------------------------
// Opening a microphone takes 100-250 ms (getUserMedia, the audio graph); opened at each press,
// that much of the start of every utterance was lost. So it is opened once, at page load (or
// at the first press with ?mic=press) and kept open while the page is visible. Its samples
// only go where a push-to-talk hold sends them: nothing leaves the page otherwise.
const WARM_MIC = new URLSearchParams(location.search).get("mic") !== "press";

let audioContext = null;
let workletLoaded = null;

async function getAudioContext() {
  if (!audioContext) audioContext = new AudioContext();
  // Browsers start a context suspended until a user gesture: a press resumes it.
  if (audioContext.state === "suspended") await audioContext.resume();
  return audioContext;
}

class Downsampler {
  // Box-filter average over each output period: enough anti-aliasing for speech.
  constructor(inRate) {
    this.ratio = inRate / RATE;
    this.buf = new Float32Array(0);
    this.pos = 0;
  }

  push(x) {
    const buf = new Float32Array(this.buf.length + x.length);
    buf.set(this.buf);
    buf.set(x, this.buf.length);
    const out = [];
    while (this.pos + this.ratio <= buf.length) {
      const a = Math.floor(this.pos);
      const b = Math.max(a + 1, Math.floor(this.pos + this.ratio));
      let sum = 0;
      for (let i = a; i < b; i++) sum += buf[i];
      const v = Math.max(-1, Math.min(1, sum / (b - a)));
      out.push(v < 0 ? v * 32768 : v * 32767);
      this.pos += this.ratio;
    }
    const used = Math.floor(this.pos);
    this.buf = buf.slice(used);
    this.pos -= used;
    return Int16Array.from(out);
  }
}

class Mic {
  constructor() {
    this.opening = null;
    this.listener = null; // receives 16 kHz s16le blocks while push-to-talk is held
    this.flushed = null;
  }

  open() {
    if (!this.opening) {
      this.opening = this._open().catch((err) => {
        this.opening = null;
        throw err;
      });
    }
    return this.opening;
  }

  async _open() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
               autoGainControl: false },
    });
    document.body.dataset.micSince = String(Math.round(performance.now()));
    if (!audioContext) audioContext = new AudioContext();
    const ctx = audioContext;
    this.down = new Downsampler(ctx.sampleRate);
    this.source = ctx.createMediaStreamSource(this.stream);
    // Kept silent, but connected: the graph only runs nodes that reach the destination.
    this.mute = ctx.createGain();
    this.mute.gain.value = 0;
    this.mute.connect(ctx.destination);
    if (ctx.audioWorklet) {
      if (!workletLoaded) workletLoaded = ctx.audioWorklet.addModule(
        assetUrl("/static/capture-worklet.js"));
      await workletLoaded;
      this.node = new AudioWorkletNode(ctx, "capture");
      this.node.port.onmessage = (e) => {
        if (e.data instanceof Float32Array) this.onBlock(e.data);
        else if (e.data && e.data.flushed) {
          this.onBlock(e.data.flushed);
          if (this.flushed) this.flushed();
        }
      };
    } else {
      // Older browsers: the deprecated ScriptProcessor still works.
      this.node = ctx.createScriptProcessor(4096, 1, 1);
      this.node.onaudioprocess = (e) => this.onBlock(e.inputBuffer.getChannelData(0).slice(0));
    }
    this.source.connect(this.node);
    this.node.connect(this.mute);
    document.body.dataset.mic = "open";
  }

  onBlock(x) {
    // Resampled all the time, so the filter state runs on; passed on only while held.
    const pcm = this.down.push(x);
    if (!this.listener) return;
    let peak = 0;
    for (let i = 0; i < x.length; i++) peak = Math.max(peak, Math.abs(x[i]));
    $("level").style.width = `${Math.min(100, Math.round(peak * 140))}%`;
    this.listener(pcm);
  }

  async flush() {
    // The worklet holds up to ~40 ms: hand it to the listener before the hold ends.
    if (this.node && this.node.port) {
      await Promise.race([
        new Promise((resolve) => {
          this.flushed = resolve;
          this.node.port.postMessage("flush");
        }),
        new Promise((resolve) => setTimeout(resolve, 300)),
      ]);
    }
    $("level").style.width = "0";
  }

  close() {
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    for (const n of [this.source, this.node, this.mute]) if (n) n.disconnect();
    this.stream = this.source = this.node = this.mute = null;
    this.opening = null;
    delete document.body.dataset.mic;
    delete document.body.dataset.micSince;
  }
}

const mic = new Mic();

// ---- one push-to-talk hold -> /ws/asr --------------------------------------------------------

class BrowserTalk {
  constructor() {
    this.ws = null;
    this.ready = false;
    this.pending = [];
    this.frame = [];
    this.framed = 0;
    this.finalWaiter = null;
    this.opened = null;
  }

  async start() {
    const ws = new WebSocket(wsUrl("/ws/asr"));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.opened = new Promise((resolve) => {
      this.onReady = resolve;
    });
    ws.onmessage = (m) => this.onMessage(JSON.parse(m.data));
    ws.onclose = (e) => {
      this.onReady(false);
      if (this.finalWaiter) this.finalWaiter(null);
      if (e.code !== 1000 && e.code !== 1005) hint(`recognition closed: ${e.reason || e.code}`, true);
    };
    ws.onerror = () => hint("cannot reach the recognition service", true);
    mic.listener = (pcm) => this.onPcm(pcm);
    await Promise.all([mic.open(), getAudioContext()]);
  }

  onMessage(msg) {
    if (msg.type === "status" && msg.status === "ready") {
      this.ws.send(JSON.stringify({ type: "control", command: "start" }));
      this.ready = true;
      for (const buf of this.pending) this.ws.send(buf);
      this.pending = [];
      this.onReady(true);
    } else if (msg.type === "result" && msg.mode === "partial") {
      showPartial(msg.text);
    } else if (msg.type === "result" && msg.mode === "final") {
      addFinal(msg.text, finalMeta("this device", msg.latency_ms, msg),
               { audioS: msg.audio_s, heldMs: this.heldMs, source: "browser" });
      logEvent("asr.final", `${msg.text} (browser, ${msg.processing_time_ms} ms decode)`);
      if (this.finalWaiter) this.finalWaiter(msg);
    } else if (msg.type === "error") {
      hint(`${msg.code}: ${msg.message}`, true);
      logEvent("error", `asr/${msg.code}: ${msg.message}`);
    }
  }

  onPcm(pcm) {
    this.frame.push(pcm);
    this.framed += pcm.length;
    if (this.framed >= FRAME_SAMPLES) this.sendFrame();
  }

  sendFrame() {
    if (!this.framed) return;
    const out = new Int16Array(this.framed);
    let at = 0;
    for (const part of this.frame) {
      out.set(part, at);
      at += part.length;
    }
    this.frame = [];
    this.framed = 0;
    if (this.ready && this.ws.readyState === WebSocket.OPEN) this.ws.send(out.buffer);
    else this.pending.push(out.buffer);
  }

  async endCapture() {
    await mic.flush();
    if (mic.listener) mic.listener = null;
    if (!WARM_MIC) mic.close();
    this.sendFrame();
  }

  async stop(heldMs) {
    this.heldMs = heldMs;
    await this.endCapture();
    const ok = await Promise.race([this.opened,
      new Promise((resolve) => setTimeout(() => resolve(false), 5000))]);
    if (!ok || this.ws.readyState !== WebSocket.OPEN) {
      this.ws.close();
      return null;
    }
    const final = new Promise((resolve) => {
      this.finalWaiter = resolve;
      setTimeout(() => resolve(null), FINAL_TIMEOUT_MS);
    });
    this.ws.send(JSON.stringify({ type: "control", command: "stop" }));
    const result = await final;
    this.ws.close(1000, "done");
    return result;
  }

  abort() {
    this.endCapture();
    if (this.ws) this.ws.close(1000, "aborted");
  }
}

// ---- push-to-talk -------------------------------------------------------------------------

const events = new EventsSocket();
let talk = null; // the browser session in progress
let starting = null;
let pressed = false;
let pressedAt = 0;

async function press() {
  if (pressed) return;
  pressed = true;
  pressedAt = performance.now();
  $("ptt").classList.add("active");
  $("ptt").setAttribute("aria-pressed", "true");
  if ($("mic").value === "daemon") {
    events.send({ command: "start" });
    return;
  }
  hint("listening…");
  talk = new BrowserTalk();
  starting = talk.start().catch((err) => {
    hint(`microphone unavailable: ${err.message || err}`, true);
    talk.abort();
    talk = null;
  });
}

async function release() {
  if (!pressed) return;
  pressed = false;
  $("ptt").classList.remove("active");
  $("ptt").setAttribute("aria-pressed", "false");
  if ($("mic").value === "daemon") {
    events.send({ command: "stop" });
    return;
  }
  await starting;
  if (!talk) return;
  const current = talk;
  talk = null;
  hint("recognising…");
  const result = await current.stop(Math.round(performance.now() - pressedAt));
  hint(result ? "Hold the button (or the space bar) while you speak." : "no result", !result);
}

function bindPtt() {
  const b = $("ptt");
  b.addEventListener("pointerdown", (e) => {
    b.setPointerCapture(e.pointerId);
    press();
  });
  for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
    b.addEventListener(name, () => release());
  }
  document.addEventListener("keydown", (e) => {
    if (e.code === "Space" && !e.repeat && e.target.tagName !== "SELECT") {
      e.preventDefault();
      press();
    }
  });
  document.addEventListener("keyup", (e) => {
    if (e.code === "Space") release();
  });
}

function warmMic() {
  if (!WARM_MIC) return;
  mic.open().catch((err) => hint(`microphone unavailable: ${err.message || err}`, true));
}

bindPtt();
events.connect();
pollHealth();
warmMic();
// A hidden page lets go of the microphone; it is opened again when the page shows.
document.addEventListener("visibilitychange", () => {
  if (document.hidden && !pressed) mic.close();
  else if (!document.hidden) warmMic();
});
// Spoken replies from /ws/tts (agent/web/player.js), loaded with this page's token.
document.head.append(Object.assign(document.createElement("script"),
  { src: assetUrl("/static/player.js") }));

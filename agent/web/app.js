// voice-agent kiosk: gate state, live partials and finals, push-to-talk, and an events log.
// Plain browser JavaScript, no build step. The page's own ?token= is passed on to every
// request, since browsers cannot put an X-API-Key header on WebSocket handshakes.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const RATE = 16000; // what /ws/asr expects: s16le mono 16 kHz
const FRAME_SAMPLES = 1600; // 100 ms per WebSocket frame
const MAX_LOG = 200;
const FINAL_TIMEOUT_MS = 30000;
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

function addFinal(text, meta) {
  const li = document.createElement("li");
  const t = document.createElement("span");
  t.className = "text";
  t.textContent = text || "(nothing recognised)";
  const m = document.createElement("span");
  m.className = "meta";
  m.textContent = meta;
  li.append(t, m);
  $("finals").prepend(li);
  showPartial("");
}

function finalMeta(source, ms, ev) {
  const parts = [source, new Date().toLocaleTimeString()];
  if (ms !== undefined && ms !== null) parts.push(`${Math.round(ms)} ms after release`);
  // Speaker and emotion arrive with later analysers; shown when an event carries them.
  if (ev.speaker) parts.push(`speaker ${ev.speaker}`);
  if (ev.emotion) parts.push(`emotion ${ev.emotion}`);
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
        addFinal(ev.text, finalMeta("daemon microphone", ev.eos_to_final_ms, ev));
        logEvent(ev.type, ev.text);
        return;
      case "error":
        logEvent("error", `${ev.stage || "api"}/${ev.code}: ${ev.message}`);
        return;
      case "command.result":
        logEvent(ev.type, `${ev.command}: gate ${ev.gate.state}`);
        return;
      default:
        logEvent(ev.type, ev.utterance_id ? `utterance ${ev.utterance_id}` : "");
    }
  }
}

// ---- browser microphone -> /ws/asr ----------------------------------------------------------

let audioContext = null;
let workletLoaded = null;

async function getAudioContext() {
  if (!audioContext) audioContext = new AudioContext();
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
    await this.openMic();
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
      addFinal(msg.text, finalMeta("this device", msg.latency_ms, msg));
      logEvent("asr.final", `${msg.text} (browser, ${msg.processing_time_ms} ms decode)`);
      if (this.finalWaiter) this.finalWaiter(msg);
    } else if (msg.type === "error") {
      hint(`${msg.code}: ${msg.message}`, true);
      logEvent("error", `asr/${msg.code}: ${msg.message}`);
    }
  }

  async openMic() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
               autoGainControl: false },
    });
    const ctx = await getAudioContext();
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
        if (e.data instanceof Float32Array) this.onSamples(e.data);
        else if (e.data && e.data.flushed) {
          this.onSamples(e.data.flushed);
          if (this.flushed) this.flushed();
        }
      };
    } else {
      // Older browsers: the deprecated ScriptProcessor still works.
      this.node = ctx.createScriptProcessor(4096, 1, 1);
      this.node.onaudioprocess = (e) => this.onSamples(e.inputBuffer.getChannelData(0).slice(0));
    }
    this.source.connect(this.node);
    this.node.connect(this.mute);
  }

  onSamples(x) {
    let peak = 0;
    for (let i = 0; i < x.length; i++) peak = Math.max(peak, Math.abs(x[i]));
    $("level").style.width = `${Math.min(100, Math.round(peak * 140))}%`;
    const pcm = this.down.push(x);
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

  async closeMic() {
    if (this.node && this.node.port) {
      // The worklet holds up to ~40 ms: take it before the microphone goes.
      await Promise.race([
        new Promise((resolve) => {
          this.flushed = resolve;
          this.node.port.postMessage("flush");
        }),
        new Promise((resolve) => setTimeout(resolve, 300)),
      ]);
    }
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    if (this.source) this.source.disconnect();
    if (this.node) this.node.disconnect();
    if (this.mute) this.mute.disconnect();
    $("level").style.width = "0";
    this.sendFrame();
  }

  async stop() {
    await this.closeMic();
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
    this.closeMic();
    if (this.ws) this.ws.close(1000, "aborted");
  }
}

// ---- push-to-talk -------------------------------------------------------------------------

const events = new EventsSocket();
let talk = null; // the browser session in progress
let starting = null;
let pressed = false;

async function press() {
  if (pressed) return;
  pressed = true;
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
  const result = await current.stop();
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

bindPtt();
events.connect();

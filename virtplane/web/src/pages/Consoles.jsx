import { useEffect, useRef, useState } from 'react';
import { Button, Label, Toolbar, ToolbarContent, ToolbarItem, Title, TextInput } from '@patternfly/react-core';
import { Terminal } from '@xterm/xterm';
import RFB from '@novnc/novnc';
import { consoleSocket, tokenProtocol } from '../api.js';

const STATE_COLOR = { connected: 'green', connecting: 'blue', disconnected: 'grey', error: 'red' };

// The serial console: xterm.js over the VMI's `console` websocket (raw bytes both ways).
export function SerialConsole({ namespace, name }) {
  const el = useRef(null);
  const [state, setState] = useState('connecting');
  const [gen, setGen] = useState(0);
  useEffect(() => {
    const term = new Terminal({ cols: 100, rows: 28, fontSize: 13, scrollback: 5000 });
    term.open(el.current);
    const { url, protocols } = consoleSocket(namespace, name, 'console');
    const ws = new WebSocket(url, protocols);
    ws.binaryType = 'arraybuffer';
    const enc = new TextEncoder();
    setState('connecting');
    ws.onopen = () => { setState('connected'); term.focus(); ws.send(enc.encode('\r')); };
    ws.onmessage = (m) => term.write(typeof m.data === 'string' ? m.data : new Uint8Array(m.data));
    ws.onclose = (e) => { setState(e.code === 1000 ? 'disconnected' : 'error'); term.write('\r\n[disconnected]\r\n'); };
    const sub = term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(enc.encode(d)); });
    return () => { sub.dispose(); ws.close(); term.dispose(); };
  }, [namespace, name, gen]);
  return (
    <div data-testid="serial-console">
      <Toolbar><ToolbarContent>
        <ToolbarItem><Title headingLevel="h3">Serial console</Title></ToolbarItem>
        <ToolbarItem><Label color={STATE_COLOR[state]} data-testid="serial-state">{state}</Label></ToolbarItem>
        <ToolbarItem><Button variant="secondary" onClick={() => setGen((g) => g + 1)}>Reconnect</Button></ToolbarItem>
      </ToolbarContent></Toolbar>
      <div className="vp-serial" ref={el} />
    </div>
  );
}

const FKEYS = Array.from({ length: 12 }, (_, i) => [`F${i + 1}`, 0xffbe + i]);

// The graphical console: noVNC over the VMI's `vnc` websocket.
export function VNCConsole({ namespace, name }) {
  const el = useRef(null);
  const rfb = useRef(null);
  const [state, setState] = useState('connecting');
  const [paste, setPaste] = useState('');
  const [gen, setGen] = useState(0);
  useEffect(() => {
    const { url } = consoleSocket(namespace, name, 'vnc');
    setState('connecting');
    const r = new RFB(el.current, url, { wsProtocols: ['binary', tokenProtocol()] });
    r.scaleViewport = true;
    r.addEventListener('connect', () => setState('connected'));
    r.addEventListener('disconnect', (e) => setState(e.detail.clean ? 'disconnected' : 'error'));
    rfb.current = r;
    return () => { try { r.disconnect(); } catch { /* already closed */ } rfb.current = null; };
  }, [namespace, name, gen]);
  // Paste as keystrokes: the guest sees typing, so it works without a clipboard agent.
  const typeText = () => {
    for (const ch of paste) {
      const code = ch === '\n' ? 0xff0d : ch.codePointAt(0);
      rfb.current && rfb.current.sendKey(code, null);
    }
    setPaste('');
  };
  return (
    <div data-testid="vnc-console">
      <Toolbar><ToolbarContent>
        <ToolbarItem><Title headingLevel="h3">VNC console</Title></ToolbarItem>
        <ToolbarItem><Label color={STATE_COLOR[state]} data-testid="vnc-state">{state}</Label></ToolbarItem>
        <ToolbarItem>
          <Button variant="secondary" onClick={() => rfb.current && rfb.current.sendCtrlAltDel()}>Send Ctrl+Alt+Del</Button>
        </ToolbarItem>
        {FKEYS.slice(0, 4).map(([label, sym]) => (
          <ToolbarItem key={label}>
            <Button variant="tertiary" size="sm" onClick={() => rfb.current && rfb.current.sendKey(sym, label)}>{label}</Button>
          </ToolbarItem>
        ))}
        <ToolbarItem>
          <TextInput value={paste} onChange={(_e, v) => setPaste(v)} placeholder="Text to type" aria-label="Paste as keystrokes" />
        </ToolbarItem>
        <ToolbarItem><Button variant="secondary" isDisabled={!paste} onClick={typeText}>Type</Button></ToolbarItem>
        <ToolbarItem><Button variant="secondary" onClick={() => setGen((g) => g + 1)}>Reconnect</Button></ToolbarItem>
      </ToolbarContent></Toolbar>
      <div className="vp-vnc" ref={el} style={{ height: 480 }} />
    </div>
  );
}

// Configuration tab: scheduling (node selector, tolerations, affinity, eviction strategy) and the SSH key, edited
// on the VM template with one JSON patch guarded by a resourceVersion test op (a VM changed meanwhile is reported,
// not overwritten). Node selector, affinity and tolerations reach a running VMI live (the VM controller carries
// them over); the eviction strategy and the SSH key (cloud-init `ssh_authorized_keys`, read at boot) need a
// restart, which the VM's RestartRequired condition then announces above the tabs.
import { useEffect, useState } from 'react';
import { Alert, Button, Form, FormGroup, FormSelect, FormSelectOption, TextArea, Title } from '@patternfly/react-core';
import * as yaml from 'js-yaml';
import { R, request, resourcePath } from '../api.js';
import { ErrorAlert } from './common.jsx';

const EVICTION = ['', 'LiveMigrate', 'LiveMigrateIfPossible', 'External', 'None'];

const selectorText = (sel) => Object.entries(sel || {}).map(([k, v]) => `${k}=${v}`).join('\n');
function parseSelector(text) {
  const out = {};
  for (const line of text.split('\n').map((l) => l.trim()).filter(Boolean)) {
    const i = line.indexOf('=');
    if (i <= 0) throw new Error(`node selector line "${line}" is not key=value`);
    out[line.slice(0, i).trim()] = line.slice(i + 1).trim();
  }
  return out;
}
const yamlText = (v) => (v === undefined || v === null ? '' : yaml.dump(v, { lineWidth: 120 }));
function parseYaml(text, what) {
  if (!text.trim()) return undefined;
  try { return yaml.load(text); } catch (e) { throw new Error(`${what}: invalid YAML: ${e.message}`); }
}

const cloudInitVolume = (spec) => (spec.volumes || []).find((v) => v.cloudInitNoCloud || v.cloudInitConfigDrive);
function sshKeysOf(spec) {
  const vol = cloudInitVolume(spec);
  const src = vol && (vol.cloudInitNoCloud || vol.cloudInitConfigDrive);
  try {
    const data = src && src.userData ? yaml.load(src.userData) : null;
    return ((data && data.ssh_authorized_keys) || []).join('\n');
  } catch { return ''; }
}

// The template spec with the SSH keys written into cloud-init's user data (a NoCloud disk is added if none).
function withSshKeys(spec, keysText) {
  const keys = keysText.split('\n').map((k) => k.trim()).filter(Boolean);
  let vol = cloudInitVolume(spec);
  if (!vol) {
    if (!keys.length) return spec;
    vol = { name: 'cloudinitdisk', cloudInitNoCloud: { userData: '#cloud-config\n' } };
    spec.volumes = [...(spec.volumes || []), vol];
    spec.domain.devices.disks = [...(spec.domain.devices.disks || []), { name: 'cloudinitdisk', disk: { bus: 'virtio' } }];
  }
  const src = vol.cloudInitNoCloud || vol.cloudInitConfigDrive;
  if (src.userDataBase64 || src.secretRef) throw new Error('the cloud-init user data is base64 or in a Secret: edit it in the YAML tab');
  const data = (src.userData ? yaml.load(src.userData) : null) || {};
  if (keys.length) data.ssh_authorized_keys = keys; else delete data.ssh_authorized_keys;
  src.userData = `#cloud-config\n${yaml.dump(data, { lineWidth: 200 })}`;
  return spec;
}

export function SchedulingSection({ vm, vmi }) {
  const tmpl = (vm.spec.template && vm.spec.template.spec) || {};
  const initial = () => ({ selector: selectorText(tmpl.nodeSelector), tolerations: yamlText(tmpl.tolerations),
    affinity: yamlText(tmpl.affinity), eviction: tmpl.evictionStrategy || '', ssh: sshKeysOf(tmpl) });
  const [f, setF] = useState(initial);
  const [dirty, setDirty] = useState(false);
  const [error, setError] = useState(null);
  const [saved, setSaved] = useState('');
  useEffect(() => { if (!dirty) setF(initial()); }, [vm.metadata.resourceVersion]); // eslint-disable-line react-hooks/exhaustive-deps
  const set = (k) => (_e, v) => { setF((s) => ({ ...s, [k]: v })); setDirty(true); setSaved(''); };
  const running = vmi && vmi.status && vmi.status.phase === 'Running';

  const save = async () => {
    setError(null);
    try {
      const spec = JSON.parse(JSON.stringify(tmpl));
      spec.domain = spec.domain || {};
      spec.domain.devices = spec.domain.devices || {};
      const fields = { nodeSelector: parseSelector(f.selector), tolerations: parseYaml(f.tolerations, 'tolerations'),
        affinity: parseYaml(f.affinity, 'affinity'), evictionStrategy: f.eviction || undefined };
      for (const [k, v] of Object.entries(fields)) {
        if (v === undefined || (k === 'nodeSelector' && !Object.keys(v).length)) delete spec[k]; else spec[k] = v;
      }
      withSshKeys(spec, f.ssh);
      const ops = [
        { op: 'test', path: '/metadata/resourceVersion', value: vm.metadata.resourceVersion },
        { op: 'replace', path: '/spec/template/spec', value: spec },
      ];
      await request('PATCH', resourcePath(R.vms, vm.metadata.namespace, vm.metadata.name), ops, 'application/json-patch+json');
      setDirty(false);
      setSaved(running ? 'Saved. Node selector, affinity and tolerations apply live; a changed eviction strategy or SSH key needs a restart (see RestartRequired).'
        : 'Saved: the VM starts with these settings.');
    } catch (e) {
      if (e.code === 409 || (e.code === 422 && /test/i.test(e.message))) {
        setError({ message: 'The VirtualMachine changed since this form was loaded: reload to see its current settings.', causes: [] });
      } else setError(e.causes ? e : { message: e.message, causes: [] });
    }
  };

  return (
    <>
      <Title headingLevel="h3" style={{ marginTop: 16 }}>Scheduling and SSH key</Title>
      <ErrorAlert error={error} title="Not saved" onClose={() => setError(null)} />
      {saved && <Alert variant="success" isInline title={saved} data-testid="scheduling-saved" />}
      <Form style={{ maxWidth: 720 }} onSubmit={(e) => { e.preventDefault(); save(); }}>
        <FormGroup label="Node selector (key=value per line)" fieldId="node-selector">
          <TextArea id="node-selector" className="vp-mono" rows={3} value={f.selector} onChange={set('selector')} />
        </FormGroup>
        <FormGroup label="Tolerations (YAML list)" fieldId="tolerations">
          <TextArea id="tolerations" className="vp-mono" rows={4} value={f.tolerations} onChange={set('tolerations')} />
        </FormGroup>
        <FormGroup label="Affinity (YAML)" fieldId="affinity">
          <TextArea id="affinity" className="vp-mono" rows={4} value={f.affinity} onChange={set('affinity')} />
        </FormGroup>
        <FormGroup label="Eviction strategy" fieldId="eviction-strategy">
          <FormSelect id="eviction-strategy" value={f.eviction} onChange={set('eviction')}>
            {EVICTION.map((e) => <FormSelectOption key={e} value={e} label={e || '(cluster default)'} />)}
          </FormSelect>
        </FormGroup>
        <FormGroup label="SSH public keys (cloud-init ssh_authorized_keys, one per line)" fieldId="ssh-keys">
          <TextArea id="ssh-keys" className="vp-mono" rows={3} value={f.ssh} onChange={set('ssh')} />
        </FormGroup>
        <div>
          <Button type="submit" isDisabled={!dirty}>Save scheduling and SSH key</Button>{' '}
          <Button variant="link" onClick={() => { setDirty(false); setError(null); setF(initial()); }}>Reset</Button>
        </div>
      </Form>
    </>
  );
}

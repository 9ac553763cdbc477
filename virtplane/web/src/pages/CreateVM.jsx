import { useMemo, useState } from 'react';
import {
  ActionGroup, Alert, Button, Checkbox, ExpandableSection, Form, FormGroup, FormHelperText, FormSelect,
  FormSelectOption, HelperText, HelperTextItem, NumberInput, PageSection, Radio, TextArea, TextInput, Title,
} from '@patternfly/react-core';
import * as yaml from 'js-yaml';
import { R, request, resourcePath, useWatch } from '../api.js';

const DEFAULT_USER_DATA = '#cloud-config\nuser: root\npassword: changeme\nchpasswd: { expire: False }\n';

// Which form field a 422 cause's field path belongs to, so the message is shown next to it.
function fieldFor(path) {
  if (!path) return 'general';
  if (path.startsWith('metadata.name')) return 'name';
  if (path.startsWith('metadata.namespace')) return 'namespace';
  if (/domain\.cpu/.test(path)) return 'cpu';
  if (/memory/.test(path)) return 'memory';
  if (/containerDisk/.test(path)) return 'image';
  if (/source\.http|\.url/.test(path)) return 'url';
  if (/storage|resources\.requests\.storage/.test(path)) return 'size';
  if (/cloudInit/.test(path)) return 'userData';
  return 'general';
}

export function buildVM(f) {
  const disks = [{ name: 'rootdisk', disk: { bus: 'virtio' } }];
  const volumes = [];
  const spec = { runStrategy: f.start ? 'Always' : 'Halted' };
  if (f.source === 'url') {
    const dv = `${f.name}-rootdisk`;
    const storage = { resources: { requests: { storage: f.size } } };
    if (f.storageClass) storage.storageClassName = f.storageClass;
    spec.dataVolumeTemplates = [{ metadata: { name: dv }, spec: { source: { http: { url: f.url } }, storage } }];
    volumes.push({ name: 'rootdisk', dataVolume: { name: dv } });
  } else {
    volumes.push({ name: 'rootdisk', containerDisk: { image: f.image } });
  }
  if (f.userData.trim()) {
    disks.push({ name: 'cloudinitdisk', disk: { bus: 'virtio' } });
    volumes.push({ name: 'cloudinitdisk', cloudInitNoCloud: { userData: f.userData } });
  }
  spec.template = {
    metadata: { labels: { 'kubevirt.io/vm': f.name } },
    spec: {
      domain: {
        cpu: { cores: Number(f.cpu) },
        resources: { requests: { memory: f.memory } },
        devices: { disks, interfaces: [{ name: 'default', masquerade: {} }] },
      },
      networks: [{ name: 'default', pod: {} }],
      volumes,
    },
  };
  return { apiVersion: 'kubevirt.io/v1', kind: 'VirtualMachine', metadata: { name: f.name, namespace: f.namespace }, spec };
}

function Field({ id, label, errors, help, children, isRequired }) {
  const err = errors[id];
  return (
    <FormGroup label={label} fieldId={id} isRequired={isRequired}>
      {children}
      <FormHelperText>
        <HelperText>
          <HelperTextItem variant={err ? 'error' : 'default'} data-testid={err ? `error-${id}` : undefined}>
            {err || help || ''}
          </HelperTextItem>
        </HelperText>
      </FormHelperText>
    </FormGroup>
  );
}

export function CreateVM() {
  const namespaces = useWatch(R.namespaces);
  const classes = useWatch(R.storageClasses);
  const [f, setF] = useState({
    name: '', namespace: 'default', source: 'containerDisk', image: '', url: '', size: '1Gi', storageClass: '',
    cpu: 1, memory: '256Mi', userData: DEFAULT_USER_DATA, start: true,
  });
  const [errors, setErrors] = useState({});
  const [general, setGeneral] = useState(null);
  const [busy, setBusy] = useState(false);
  const set = (k) => (_e, v) => setF((s) => ({ ...s, [k]: v }));
  const manifest = useMemo(() => buildVM(f), [f]);
  const v = (k) => (errors[k] ? 'error' : 'default');

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setErrors({});
    setGeneral(null);
    try {
      await request('POST', resourcePath(R.vms, f.namespace), manifest);
      location.hash = `/vms/${f.namespace}/${f.name}`;
    } catch (err) {
      const byField = {};
      const rest = [];
      for (const c of err.causes || []) {
        const k = fieldFor(c.field);
        if (k === 'general') rest.push(c);
        else byField[k] = byField[k] ? `${byField[k]}; ${c.message}` : c.message;
      }
      setErrors(byField);
      if (rest.length || Object.keys(byField).length === 0) setGeneral({ ...err, message: err.message, causes: rest });
    } finally {
      setBusy(false);
    }
  };

  return (
    <PageSection>
      <Title headingLevel="h1">Create VirtualMachine</Title>
      {general && (
        <Alert variant="danger" isInline title={general.message} data-testid="create-error">
          {general.causes.length > 0 && <ul>{general.causes.map((c, i) => <li key={i}><code>{c.field}</code> {c.message}</li>)}</ul>}
        </Alert>
      )}
      <Form onSubmit={submit} style={{ maxWidth: 720 }}>
        <Field id="name" label="Name" errors={errors} isRequired help="Lower-case letters, digits and '-'.">
          <TextInput id="name" value={f.name} onChange={set('name')} validated={v('name')} />
        </Field>
        <Field id="namespace" label="Namespace" errors={errors}>
          <FormSelect id="namespace" value={f.namespace} onChange={set('namespace')} validated={v('namespace')}>
            {(namespaces.items.length ? namespaces.items.map((n) => n.metadata.name) : ['default']).map((n) => (
              <FormSelectOption key={n} value={n} label={n} />
            ))}
          </FormSelect>
        </Field>
        <FormGroup label="Boot source" role="radiogroup" isInline fieldId="source">
          <Radio id="src-cd" name="source" label="Container disk (registry image)" isChecked={f.source === 'containerDisk'}
            onChange={() => setF((s) => ({ ...s, source: 'containerDisk' }))} />
          <Radio id="src-url" name="source" label="Import from URL (DataVolume)" isChecked={f.source === 'url'}
            onChange={() => setF((s) => ({ ...s, source: 'url' }))} />
        </FormGroup>
        {f.source === 'containerDisk' ? (
          <Field id="image" label="Image" errors={errors} isRequired help="e.g. registry.example:5000/os/disk:latest">
            <TextInput id="image" value={f.image} onChange={set('image')} validated={v('image')} />
          </Field>
        ) : (
          <>
            <Field id="url" label="Image URL" errors={errors} isRequired help="http(s) URL of a qcow2 or raw image">
              <TextInput id="url" value={f.url} onChange={set('url')} validated={v('url')} />
            </Field>
            <Field id="size" label="Disk size" errors={errors}>
              <TextInput id="size" value={f.size} onChange={set('size')} validated={v('size')} />
            </Field>
            <Field id="storageClass" label="Storage class" errors={errors}>
              <FormSelect id="storageClass" value={f.storageClass} onChange={set('storageClass')}>
                <FormSelectOption value="" label="(default)" />
                {classes.items.map((c) => <FormSelectOption key={c.metadata.name} value={c.metadata.name} label={c.metadata.name} />)}
              </FormSelect>
            </Field>
          </>
        )}
        <Field id="cpu" label="CPU cores" errors={errors}>
          <NumberInput id="cpu" value={f.cpu} min={1} onMinus={() => setF((s) => ({ ...s, cpu: Math.max(1, s.cpu - 1) }))}
            onPlus={() => setF((s) => ({ ...s, cpu: s.cpu + 1 }))}
            onChange={(e) => setF((s) => ({ ...s, cpu: Number(e.target.value) || 1 }))} inputAriaLabel="CPU cores" />
        </Field>
        <Field id="memory" label="Memory" errors={errors} help="e.g. 256Mi, 2Gi">
          <TextInput id="memory" value={f.memory} onChange={set('memory')} validated={v('memory')} />
        </Field>
        <Field id="userData" label="cloud-init user data" errors={errors}>
          <TextArea id="userData" className="vp-mono" value={f.userData} rows={6} onChange={set('userData')} validated={v('userData')} />
        </Field>
        <Checkbox id="start" label="Start the VirtualMachine after creation" isChecked={f.start} onChange={(_e, c) => setF((s) => ({ ...s, start: c }))} />
        <ExpandableSection toggleText="Review as YAML">
          <pre className="vp-mono" data-testid="review-yaml">{yaml.dump(manifest, { lineWidth: 120 })}</pre>
        </ExpandableSection>
        <ActionGroup>
          <Button type="submit" variant="primary" isDisabled={busy || !f.name} isLoading={busy}>Create</Button>
          <Button variant="link" component="a" href="#/vms">Cancel</Button>
        </ActionGroup>
      </Form>
    </PageSection>
  );
}

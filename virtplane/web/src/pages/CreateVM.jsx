import { useMemo, useState } from 'react';
import {
  ActionGroup, Alert, Button, Card, CardBody, CardHeader, CardTitle, Checkbox, ExpandableSection, FileUpload, Form,
  FormGroup, FormHelperText, FormSelect, FormSelectOption, FormSelectOptionGroup, Gallery, HelperText, HelperTextItem,
  NumberInput, PageSection, Progress, Radio, TextArea, TextInput, Title,
} from '@patternfly/react-core';
import * as yaml from 'js-yaml';
import { R, request, resourcePath, uploadImage, useWatch, waitForObject } from '../api.js';

const DEFAULT_USER_DATA = '#cloud-config\nuser: root\npassword: changeme\nchpasswd: { expire: False }\n';

// Which form field a 422 cause's field path belongs to, so the message is shown next to it.
function fieldFor(path) {
  if (!path) return 'general';
  if (path.startsWith('metadata.name')) return 'name';
  if (path.startsWith('metadata.namespace')) return 'namespace';
  if (/conflicts|instancetype/.test(path)) return 'instancetype';
  if (/domain\.cpu/.test(path)) return 'cpu';
  if (/memory/.test(path)) return 'memory';
  if (/containerDisk/.test(path)) return 'image';
  if (/source\.http|\.url/.test(path)) return 'url';
  if (/storage|resources\.requests\.storage/.test(path)) return 'size';
  if (/cloudInit/.test(path)) return 'userData';
  return 'general';
}

const ANN_ENDPOINT = 'upload.virtplane.io/endpoint'; // the PVC is ready for an upload (DataVolume UploadReady)
const ANN_POD_READY = 'cdi.kubevirt.io/storage.pod.ready';
const ANN_IMMEDIATE = 'cdi.kubevirt.io/storage.bind.immediate.requested';
const rootVolume = (f) => `${f.name}-rootdisk`;

// The DataVolume an upload goes into, created before the VM (as `virtctl image-upload` does).
export function uploadDataVolume(f) {
  const storage = { resources: { requests: { storage: f.size } } };
  if (f.storageClass) storage.storageClassName = f.storageClass;
  return {
    apiVersion: 'cdi.kubevirt.io/v1beta1', kind: 'DataVolume',
    metadata: { name: rootVolume(f), namespace: f.namespace, annotations: { [ANN_IMMEDIATE]: 'true' } },
    spec: { source: { upload: {} }, contentType: 'kubevirt', storage },
  };
}

export function buildVM(f) {
  // With a preference the disk bus is left to it (preferredDiskBus); otherwise virtio.
  const bus = f.preference ? {} : { bus: 'virtio' };
  const disks = [{ name: 'rootdisk', disk: { ...bus } }];
  const volumes = [];
  const spec = { runStrategy: f.start ? 'Always' : 'Halted' };
  const storage = { resources: { requests: { storage: f.size } } };
  if (f.storageClass) storage.storageClassName = f.storageClass;
  if (f.source === 'url' || f.source === 'clone') {
    const dv = rootVolume(f);
    const [pvcNs, pvcName] = (f.pvc || '/').split('/');
    const source = f.source === 'url' ? { http: { url: f.url } } : { pvc: { namespace: pvcNs, name: pvcName } };
    spec.dataVolumeTemplates = [{ metadata: { name: dv }, spec: { source, storage } }];
    volumes.push({ name: 'rootdisk', dataVolume: { name: dv } });
  } else if (f.source === 'upload') {
    volumes.push({ name: 'rootdisk', dataVolume: { name: rootVolume(f) } });
  } else {
    volumes.push({ name: 'rootdisk', containerDisk: { image: f.image } });
  }
  if (f.userData.trim()) {
    disks.push({ name: 'cloudinitdisk', disk: { ...bus } });
    volumes.push({ name: 'cloudinitdisk', cloudInitNoCloud: { userData: f.userData } });
  }
  if (f.instancetype) spec.instancetype = { kind: 'VirtualMachineClusterInstancetype', name: f.instancetype };
  if (f.preference) spec.preference = { kind: 'VirtualMachineClusterPreference', name: f.preference };
  const domain = { devices: { disks, interfaces: [{ name: 'default', masquerade: {} }] } };
  if (!f.instancetype) {
    domain.cpu = { cores: Number(f.cpu) };
    domain.resources = { requests: { memory: f.memory } };
  }
  spec.template = {
    metadata: { labels: { 'kubevirt.io/vm': f.name } },
    spec: { domain, networks: [{ name: 'default', pod: {} }], volumes },
  };
  return { apiVersion: 'kubevirt.io/v1', kind: 'VirtualMachine', metadata: { name: f.name, namespace: f.namespace }, spec };
}

const GIB = 1024 ** 3;
function bytes(q) {
  const m = /^([0-9.]+)([KMGTE]i?)?$/.exec(String(q || ''));
  if (!m) return 0;
  const mult = { Ki: 1024, Mi: 1024 ** 2, Gi: GIB, Ti: 1024 ** 4, K: 1e3, M: 1e6, G: 1e9, T: 1e12 }[m[2]] || 1;
  return Number(m[1]) * mult;
}
const series = (it) => (it.metadata.labels || {})['instancetype.kubevirt.io/common-instancetypes-series']
  || it.metadata.name.split('.')[0];
const itLabel = (it) => `${it.metadata.name}: ${it.spec.cpu.guest} CPU, ${it.spec.memory.guest} memory`;
const prefName = (p) => ((p.metadata.annotations || {})['openshift.io/display-name']) || p.metadata.name;

// What the chosen preference requires that the chosen instance type does not give (the server refuses to
// start such a VM: "insufficient ... preference requires ...").
function requirementProblem(it, pref) {
  const req = pref && pref.spec && pref.spec.requirements;
  if (!req || !it) return null;
  if (req.cpu && it.spec.cpu.guest < req.cpu.guest) return `${prefName(pref)} needs at least ${req.cpu.guest} vCPUs`;
  if (req.memory && bytes(it.spec.memory.guest) < bytes(req.memory.guest)) {
    return `${prefName(pref)} needs at least ${req.memory.guest} of memory`;
  }
  return null;
}

// The catalog: the cluster's preferences (operating systems) as cards, and its instance types by series.
function Catalog({ f, setF, instancetypes, preferences, errors }) {
  const groups = {};
  for (const it of instancetypes) (groups[series(it)] = groups[series(it)] || []).push(it);
  for (const g of Object.values(groups)) g.sort((a, b) => a.spec.cpu.guest - b.spec.cpu.guest || bytes(a.spec.memory.guest) - bytes(b.spec.memory.guest));
  const prefs = [...preferences].sort((a, b) => prefName(a).localeCompare(prefName(b)));
  const pick = (name) => setF((s) => ({ ...s, preference: name }));
  return (
    <>
      <FormGroup label="Operating system (preference)" fieldId="preference">
        <Gallery hasGutter minWidths={{ default: '170px' }} data-testid="preference-catalog">
          <Card isCompact isSelectable isSelected={!f.preference} data-testid="pref-none" id="pref-none">
            <CardHeader selectableActions={{ selectableActionId: 'pref-sel-none', name: 'preference', variant: 'single',
              isChecked: !f.preference, onChange: () => pick(''), selectableActionAriaLabel: 'No preference' }}>
              <CardTitle>None</CardTitle>
            </CardHeader>
            <CardBody style={{ fontSize: 'small' }}>devices set by the VM</CardBody>
          </Card>
          {prefs.map((p) => {
            const req = p.spec.requirements || {};
            return (
              <Card key={p.metadata.name} isCompact isSelectable isSelected={f.preference === p.metadata.name}
                data-testid={`pref-${p.metadata.name}`} id={`pref-${p.metadata.name}`}>
                <CardHeader selectableActions={{ selectableActionId: `pref-sel-${p.metadata.name}`, name: 'preference',
                  variant: 'single', isChecked: f.preference === p.metadata.name, onChange: () => pick(p.metadata.name),
                  selectableActionAriaLabel: prefName(p) }}>
                  <CardTitle>{prefName(p)}</CardTitle>
                </CardHeader>
                <CardBody style={{ fontSize: 'small' }}>
                  {p.metadata.name}
                  {req.cpu || req.memory ? <div>min {req.cpu ? `${req.cpu.guest} CPU` : ''} {req.memory ? req.memory.guest : ''}</div> : null}
                  {p.spec.devices && p.spec.devices.preferredDiskBus ? <div>disk bus {p.spec.devices.preferredDiskBus}</div> : null}
                </CardBody>
              </Card>
            );
          })}
        </Gallery>
        <FormHelperText><HelperText><HelperTextItem>
          {f.preference ? `Preference ${f.preference}: fills in the disk bus, NIC model, firmware and more where the VM leaves them unset.`
            : 'None chosen: the VM sets its devices itself (virtio).'}
        </HelperTextItem></HelperText></FormHelperText>
      </FormGroup>
      <Field id="instancetype" label="Size (instance type)" errors={errors}
        help={f.instancetype ? 'CPU and memory come from the instance type.' : 'Custom: set CPU and memory below.'}>
        <FormSelect id="instancetype" value={f.instancetype} onChange={(_e, v) => setF((s) => ({ ...s, instancetype: v }))}
          aria-label="Instance type">
          <FormSelectOption value="" label="Custom (CPU and memory below)" />
          {Object.keys(groups).sort().map((g) => {
            const display = (groups[g][0].metadata.annotations || {})['instancetype.kubevirt.io/displayName'] || g;
            return (
              <FormSelectOptionGroup key={g} label={`${g}: ${display}`}>
                {groups[g].map((it) => <FormSelectOption key={it.metadata.name} value={it.metadata.name} label={itLabel(it)} />)}
              </FormSelectOptionGroup>
            );
          })}
        </FormSelect>
      </Field>
    </>
  );
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
  const instancetypes = useWatch(R.clusterInstancetypes);
  const preferences = useWatch(R.clusterPreferences);
  const pvcs = useWatch(R.pvcs);
  const [f, setF] = useState({
    name: '', namespace: 'default', source: 'containerDisk', image: '', url: '', size: '1Gi', storageClass: '',
    cpu: 1, memory: '256Mi', userData: DEFAULT_USER_DATA, start: true, instancetype: '', preference: '', pvc: '',
  });
  const [file, setFile] = useState(null);
  const [upload, setUpload] = useState(null); // {sent, total, stage}
  const [errors, setErrors] = useState({});
  const [general, setGeneral] = useState(null);
  const [busy, setBusy] = useState(false);
  const set = (k) => (_e, v) => setF((s) => ({ ...s, [k]: v }));
  const manifest = useMemo(() => buildVM(f), [f]);
  const v = (k) => (errors[k] ? 'error' : 'default');
  const chosenIt = instancetypes.items.find((i) => i.metadata.name === f.instancetype);
  const chosenPref = preferences.items.find((p) => p.metadata.name === f.preference);
  const mismatch = requirementProblem(chosenIt, chosenPref);

  // Upload boot source: check the VM with a dry run first (a bad name is reported before any bytes move), then
  // the DataVolume, its PVC ready for the upload (watched), the image with progress, and only then the VM.
  const uploadThenCreate = async () => {
    await request('POST', `${resourcePath(R.vms, f.namespace)}?dryRun=All`, manifest);
    if (!file) throw Object.assign(new Error('choose an image file to upload'), { causes: [] });
    setUpload({ sent: 0, total: file.size, stage: 'Creating the DataVolume' });
    const dv = uploadDataVolume(f);
    try {
      await request('POST', resourcePath(R.dataVolumes, f.namespace), dv);
    } catch (err) {
      if (err.code !== 409) throw err; // an earlier attempt's volume: upload into it again
    }
    setUpload({ sent: 0, total: file.size, stage: 'Waiting for the volume to be ready for the upload' });
    await waitForObject(R.pvcs, f.namespace, dv.metadata.name, (pvc) => {
      const a = pvc.metadata.annotations || {};
      return a[ANN_ENDPOINT] && String(a[ANN_POD_READY] || 'true') === 'true';
    }, 180_000, `${dv.metadata.name} to be ready for an upload`);
    setUpload({ sent: 0, total: file.size, stage: 'Uploading' });
    await uploadImage(f.namespace, dv.metadata.name, file, (sent, total) => setUpload({ sent, total, stage: 'Uploading' }));
    setUpload({ sent: file.size, total: file.size, stage: 'Uploaded' });
    await request('POST', resourcePath(R.vms, f.namespace), manifest);
  };

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setErrors({});
    setGeneral(null);
    try {
      if (f.source === 'upload') await uploadThenCreate();
      else await request('POST', resourcePath(R.vms, f.namespace), manifest);
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
        <Catalog f={f} setF={setF} instancetypes={instancetypes.items} preferences={preferences.items} errors={errors} />
        {mismatch && <Alert variant="warning" isInline title={`${f.instancetype} is too small: ${mismatch}`} data-testid="requirements-warning" />}
        <FormGroup label="Boot source" role="radiogroup" isInline fieldId="source">
          <Radio id="src-cd" name="source" label="Container disk (registry image)" isChecked={f.source === 'containerDisk'}
            onChange={() => setF((s) => ({ ...s, source: 'containerDisk' }))} />
          <Radio id="src-url" name="source" label="Import from URL (DataVolume)" isChecked={f.source === 'url'}
            onChange={() => setF((s) => ({ ...s, source: 'url' }))} />
          <Radio id="src-upload" name="source" label="Upload an image (DataVolume)" isChecked={f.source === 'upload'}
            onChange={() => setF((s) => ({ ...s, source: 'upload' }))} />
          <Radio id="src-clone" name="source" label="Clone a volume (PVC)" isChecked={f.source === 'clone'}
            onChange={() => setF((s) => ({ ...s, source: 'clone' }))} />
        </FormGroup>
        {f.source === 'containerDisk' && (
          <Field id="image" label="Image" errors={errors} isRequired help="e.g. registry.example:5000/os/disk:latest">
            <TextInput id="image" value={f.image} onChange={set('image')} validated={v('image')} />
          </Field>
        )}
        {f.source === 'url' && (
          <Field id="url" label="Image URL" errors={errors} isRequired help="http(s) URL of a qcow2 or raw image">
            <TextInput id="url" value={f.url} onChange={set('url')} validated={v('url')} />
          </Field>
        )}
        {f.source === 'upload' && (
          <Field id="upload" label="Image file" errors={errors} isRequired help="qcow2 or raw, sent to CDI's upload proxy">
            <FileUpload id="upload" filename={file ? file.name : ''} browseButtonText="Choose file" hideDefaultPreview
              onFileInputChange={(_e, fl) => setFile(fl)} onClearClick={() => setFile(null)}
              filenamePlaceholder="Drag a file here or choose one" />
            {upload && (
              <Progress data-testid="upload-progress" title={upload.stage} style={{ marginTop: 8 }}
                value={upload.total ? Math.round((100 * upload.sent) / upload.total) : 0}
                label={`${(upload.sent / 1048576).toFixed(1)} / ${(upload.total / 1048576).toFixed(1)} MiB`} />
            )}
          </Field>
        )}
        {f.source === 'clone' && (
          <Field id="pvc" label="Source volume" errors={errors} isRequired help="A PVC (or a DataVolume's PVC) to copy">
            <FormSelect id="pvc" value={f.pvc} onChange={set('pvc')} validated={v('pvc')}>
              <FormSelectOption value="" label="Choose a volume" isDisabled />
              {pvcs.items.map((p) => {
                const k = `${p.metadata.namespace}/${p.metadata.name}`;
                const size = ((p.spec.resources || {}).requests || {}).storage || '';
                return <FormSelectOption key={k} value={k} label={`${k} (${size})`} />;
              })}
            </FormSelect>
          </Field>
        )}
        {f.source !== 'containerDisk' && (
          <>
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
        {!f.instancetype && (<>
        <Field id="cpu" label="CPU cores" errors={errors}>
          <NumberInput id="cpu" value={f.cpu} min={1} onMinus={() => setF((s) => ({ ...s, cpu: Math.max(1, s.cpu - 1) }))}
            onPlus={() => setF((s) => ({ ...s, cpu: s.cpu + 1 }))}
            onChange={(e) => setF((s) => ({ ...s, cpu: Number(e.target.value) || 1 }))} inputAriaLabel="CPU cores" />
        </Field>
        <Field id="memory" label="Memory" errors={errors} help="e.g. 256Mi, 2Gi">
          <TextInput id="memory" value={f.memory} onChange={set('memory')} validated={v('memory')} />
        </Field>
        </>)}
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

// Apache Curator 5 (and the ZooKeeper 3.8 Java client under it) against one ZooKeeper-protocol server.
//
// Usage: java -cp <curator, zookeeper and slf4j jars>:<dir> CuratorCheck HOST:PORT [SCENARIO ...]
//        java ... CuratorCheck --list
//
// Prints one line per scenario, `PASS <name>` or `FAIL <name>: <reason>`, plus `# ...` lines with
// timings and facts worth knowing; exits 1 if any scenario failed. Each scenario works under its
// own Curator namespace (`cc-<run>-<name>`), has its own deadline, and waits for what it expects
// (events, states, latches) with bounded waits rather than fixed sleeps. The client's own log goes
// to stderr; lines that mean the client dropped a connection over a malformed or out-of-order
// reply (the client's "Xid out of order", an EOFException while reading a reply, ...) fail the
// scenario that was running even when Curator recovered by retrying.

import java.io.ByteArrayOutputStream;
import java.io.Closeable;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.PrintStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.Callable;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.function.Consumer;

import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.api.transaction.CuratorTransactionResult;
import org.apache.curator.framework.api.transaction.OperationType;
import org.apache.curator.framework.recipes.atomic.AtomicValue;
import org.apache.curator.framework.recipes.atomic.DistributedAtomicLong;
import org.apache.curator.framework.recipes.barriers.DistributedBarrier;
import org.apache.curator.framework.recipes.barriers.DistributedDoubleBarrier;
import org.apache.curator.framework.recipes.cache.ChildData;
import org.apache.curator.framework.recipes.cache.CuratorCache;
import org.apache.curator.framework.recipes.cache.CuratorCacheListener;
import org.apache.curator.framework.recipes.leader.LeaderLatch;
import org.apache.curator.framework.recipes.leader.LeaderLatchListener;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.framework.recipes.locks.InterProcessSemaphoreV2;
import org.apache.curator.framework.recipes.locks.Lease;
import org.apache.curator.framework.recipes.shared.SharedCount;
import org.apache.curator.framework.recipes.shared.SharedCountListener;
import org.apache.curator.framework.recipes.shared.SharedCountReader;
import org.apache.curator.framework.recipes.shared.VersionedValue;
import org.apache.curator.framework.state.ConnectionState;
import org.apache.curator.retry.RetryNTimes;
import org.apache.zookeeper.AddWatchMode;
import org.apache.zookeeper.CreateMode;
import org.apache.zookeeper.KeeperException;
import org.apache.zookeeper.OpResult;
import org.apache.zookeeper.Watcher;
import org.apache.zookeeper.ZooDefs;
import org.apache.zookeeper.ZooKeeper;
import org.apache.zookeeper.data.ACL;
import org.apache.zookeeper.data.Id;
import org.apache.zookeeper.data.Stat;
import org.apache.zookeeper.server.auth.DigestAuthenticationProvider;

public final class CuratorCheck {
    /** Wall-clock limit of one scenario; its own waits are shorter, so a hang is reported by the step it hung in. */
    static final long SCENARIO_DEADLINE_S = 60;
    /** Default bound of one wait for an event, a state or a latch. */
    static final long WAIT_S = 15;
    /** Session timeout asked for by ordinary clients (the server may clamp it). */
    static final int SESSION_MS = 15_000;
    /** Client log lines that mean the client gave up on a connection because of what the server sent. */
    static final String[] PROTOCOL_ERRORS = {
        "Xid out of order",
        "java.io.EOFException",
        "Unreasonable length",
        "Packet len",
        "Nothing in the queue",
        "MarshallingError",
    };

    static String connect;
    static final String RUN = Long.toString(System.currentTimeMillis() % 2_000_000_000L, 36);
    static final LogTap LOG = new LogTap(System.err);
    static final Map<String, Scenario> SCENARIOS = new LinkedHashMap<>();

    static {
        SCENARIOS.put("crud", CuratorCheck::crud);
        SCENARIOS.put("sequential_ephemeral", CuratorCheck::sequentialEphemeral);
        SCENARIOS.put("transaction", CuratorCheck::transaction);
        SCENARIOS.put("mutex", CuratorCheck::mutex);
        SCENARIOS.put("leader_latch", CuratorCheck::leaderLatch);
        SCENARIOS.put("curator_cache", CuratorCheck::curatorCache);
        SCENARIOS.put("atomic_long", CuratorCheck::atomicLong);
        SCENARIOS.put("semaphore", CuratorCheck::semaphore);
        SCENARIOS.put("shared_count", CuratorCheck::sharedCount);
        SCENARIOS.put("barrier", CuratorCheck::barrier);
        SCENARIOS.put("double_barrier", CuratorCheck::doubleBarrier);
        SCENARIOS.put("digest_acl", CuratorCheck::digestAcl);
        SCENARIOS.put("session_expiry", CuratorCheck::sessionExpiry);
        SCENARIOS.put("session_timeout", CuratorCheck::sessionTimeout);
        SCENARIOS.put("watch_reconnect", CuratorCheck::watchReconnect);
        SCENARIOS.put("persistent_watch", CuratorCheck::persistentWatch);
    }

    interface Scenario {
        void run(Ctx ctx) throws Exception;
    }

    interface Step {
        void run() throws Exception;
    }

    /** A check that did not hold: the scenario fails with this message. */
    static final class Failure extends RuntimeException {
        private static final long serialVersionUID = 1L;

        Failure(String message) {
            super(message);
        }
    }

    public static void main(String[] args) throws Exception {
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", System.getProperty("cc.log", "warn"));
        System.setProperty("org.slf4j.simpleLogger.showDateTime", "true");
        System.setProperty("org.slf4j.simpleLogger.dateTimeFormat", "HH:mm:ss.SSS");
        System.setErr(new PrintStream(LOG, true, StandardCharsets.UTF_8));
        if (args.length == 1 && args[0].equals("--list")) {
            SCENARIOS.keySet().forEach(System.out::println);
            return;
        }
        if (args.length < 1) {
            System.out.println("usage: CuratorCheck HOST:PORT [SCENARIO ...] | --list");
            System.exit(2);
        }
        connect = args[0];
        List<String> names = args.length > 1 ? Arrays.asList(args).subList(1, args.length) : new ArrayList<>(SCENARIOS.keySet());
        for (String name : names) {
            if (!SCENARIOS.containsKey(name)) {
                System.out.println("unknown scenario " + name + "; known: " + SCENARIOS.keySet());
                System.exit(2);
            }
        }
        System.out.println("# server " + connect + ", run " + RUN + ", " + names.size() + " scenarios");
        int failed = 0;
        long started = System.nanoTime();
        for (String name : names) {
            if (!runOne(name, SCENARIOS.get(name))) {
                failed++;
            }
        }
        System.out.printf("# %d passed, %d failed in %.1f s%n", names.size() - failed, failed, (System.nanoTime() - started) / 1e9);
        System.out.flush();
        System.exit(failed == 0 ? 0 : 1);
    }

    static boolean runOne(String name, Scenario scenario) {
        Ctx ctx = new Ctx(name);
        int mark = LOG.mark();
        long started = System.nanoTime();
        ExecutorService runner = Executors.newSingleThreadExecutor(r -> {
            Thread t = new Thread(r, "scenario-" + name);
            t.setDaemon(true);
            ctx.thread = t;
            return t;
        });
        String reason = null;
        Future<?> future = runner.submit(() -> {
            scenario.run(ctx);
            return null;
        });
        try {
            future.get(SCENARIO_DEADLINE_S, TimeUnit.SECONDS);
        } catch (TimeoutException e) {
            reason = "no result within " + SCENARIO_DEADLINE_S + " s" + where(ctx);
            future.cancel(true);
        } catch (java.util.concurrent.ExecutionException e) {
            Throwable t = e.getCause();
            reason = t instanceof Failure ? t.getMessage() : "unexpected " + describe(t);
        } catch (InterruptedException e) {
            reason = "interrupted";
        } finally {
            runner.shutdownNow();
            ctx.close();
        }
        List<String> reasons = new ArrayList<>(ctx.softFailures);
        if (reason != null) {
            reasons.add(ctx.step != null ? "[" + ctx.step + "] " + reason : reason);
        }
        List<String> problems = LOG.protocolErrorsSince(mark);
        if (!problems.isEmpty()) {
            reasons.add("client dropped a connection: " + String.join(" | ", problems));
        }
        reason = reasons.isEmpty() ? null : String.join("; ", reasons);
        double took = (System.nanoTime() - started) / 1e9;
        for (String note : ctx.notes) {
            System.out.println("# " + name + ": " + note);
        }
        System.out.printf("# %s took %.2f s%n", name, took);
        System.out.println(reason == null ? "PASS " + name : "FAIL " + name + ": " + oneLine(reason));
        System.out.flush();
        return reason == null;
    }

    static String where(Ctx ctx) {
        Thread t = ctx.thread;
        if (t == null) {
            return "";
        }
        StringBuilder out = new StringBuilder("; scenario thread at");
        int shown = 0;
        for (StackTraceElement frame : t.getStackTrace()) {
            String cls = frame.getClassName();
            if (cls.startsWith("java.") || cls.startsWith("jdk.") || cls.startsWith("sun.")) {
                continue;
            }
            out.append(' ').append(frame.getClassName().replaceAll(".*\\.", "")).append('.').append(frame.getMethodName())
                .append(':').append(frame.getLineNumber());
            if (++shown == 4) {
                break;
            }
        }
        return out.toString();
    }

    static String describe(Throwable t) {
        StringBuilder out = new StringBuilder();
        Throwable cur = t;
        for (int depth = 0; cur != null && depth < 4; depth++, cur = cur.getCause()) {
            if (depth > 0) {
                out.append(" <- caused by ");
            }
            out.append(cur.getClass().getName()).append(": ").append(cur.getMessage());
        }
        for (StackTraceElement frame : t.getStackTrace()) {
            if (frame.getClassName().equals(CuratorCheck.class.getName())) {
                out.append(" (at CuratorCheck.java:").append(frame.getLineNumber()).append(')');
                break;
            }
        }
        return out.toString();
    }

    static String oneLine(String s) {
        return s.replaceAll("\\s*\\R\\s*", " / ");
    }

    // ---- helpers ------------------------------------------------------------------------------

    static byte[] bytes(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    static String text(byte[] b) {
        return b == null ? "<null>" : new String(b, StandardCharsets.UTF_8);
    }

    /** ACLs as `perms:scheme:id` strings (ACL's own toString spans lines). */
    static List<String> acls(List<ACL> list) {
        List<String> out = new ArrayList<>();
        for (ACL a : list) {
            out.add(a.getPerms() + ":" + a.getId().getScheme() + ":" + a.getId().getId());
        }
        return out;
    }

    static void check(boolean ok, String what, Object... args) {
        if (!ok) {
            throw new Failure(String.format(what, args));
        }
    }

    static void checkEq(Object expected, Object actual, String what) {
        if (!java.util.Objects.equals(expected, actual)) {
            throw new Failure(what + ": expected " + expected + ", got " + actual);
        }
    }

    static <T extends Throwable> T expectThrows(Class<T> type, String what, Step step) {
        try {
            step.run();
        } catch (Throwable t) {
            if (type.isInstance(t)) {
                return type.cast(t);
            }
            throw new Failure(what + ": expected " + type.getSimpleName() + ", got " + describe(t));
        }
        throw new Failure(what + ": expected " + type.getSimpleName() + ", but it succeeded");
    }

    /** Poll cond until it holds; fail naming `what` after seconds. For state that has no event to wait for. */
    static void waitUntil(String what, long seconds, Callable<Boolean> cond) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(seconds);
        Exception last = null;
        while (System.nanoTime() < deadline) {
            try {
                if (cond.call()) {
                    return;
                }
            } catch (Exception e) {
                last = e;
            }
            Thread.sleep(20);
        }
        throw new Failure("timed out after " + seconds + " s waiting for " + what + (last == null ? "" : " (last error: " + describe(last) + ")"));
    }

    static <T> T within(String what, long seconds, Future<T> f) throws Exception {
        try {
            return f.get(seconds, TimeUnit.SECONDS);
        } catch (TimeoutException e) {
            throw new Failure("timed out after " + seconds + " s waiting for " + what);
        } catch (java.util.concurrent.ExecutionException e) {
            Throwable t = e.getCause();
            if (t instanceof Failure) {
                throw (Failure) t;
            }
            throw new Failure(what + " failed: " + describe(t));
        }
    }

    /** Watch events (type and path, Curator's namespace already stripped) or cache events, in arrival order. */
    static final class Events {
        final String label;
        final BlockingQueue<String> queue = new LinkedBlockingQueue<>();
        final List<String> seen = Collections.synchronizedList(new ArrayList<>());

        Events(String label) {
            this.label = label;
        }

        void add(String event) {
            seen.add(event);
            queue.add(event);
        }

        /** A watcher that records node events (connection-state events, type None, are left out). */
        Watcher watcher() {
            return e -> {
                if (e.getType() != Watcher.Event.EventType.None) {
                    add(e.getType() + " " + e.getPath());
                }
            };
        }

        /** The next event must be `expected`. */
        void next(String expected) throws InterruptedException {
            next(expected, WAIT_S);
        }

        void next(String expected, long seconds) throws InterruptedException {
            String got = queue.poll(seconds, TimeUnit.SECONDS);
            if (got == null) {
                throw new Failure(label + ": no event within " + seconds + " s, expected '" + expected + "' (all seen: " + seen + ")");
            }
            if (!got.equals(expected)) {
                throw new Failure(label + ": expected event '" + expected + "', got '" + got + "' (all seen: " + seen + ")");
            }
        }

        /** No event is pending right now. */
        void none(String why) {
            String got = queue.poll();
            if (got != null) {
                throw new Failure(label + ": unexpected event '" + got + "' " + why + " (all seen: " + seen + ")");
            }
        }
    }

    /** Curator connection states of one client, in order. */
    static final class States {
        final String label;
        final BlockingQueue<ConnectionState> queue = new LinkedBlockingQueue<>();
        final List<ConnectionState> seen = Collections.synchronizedList(new ArrayList<>());

        States(String label, CuratorFramework client) {
            this.label = label;
            client.getConnectionStateListenable().addListener((c, state) -> {
                seen.add(state);
                queue.add(state);
            });
        }

        /** Consume states until `wanted` arrives. */
        void await(ConnectionState wanted, long seconds) throws InterruptedException {
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(seconds);
            while (true) {
                long left = deadline - System.nanoTime();
                ConnectionState got = left > 0 ? queue.poll(left, TimeUnit.NANOSECONDS) : null;
                if (got == null) {
                    throw new Failure(label + ": not " + wanted + " within " + seconds + " s (states so far: " + seen + ")");
                }
                if (got == wanted) {
                    return;
                }
            }
        }

        int count(ConnectionState s) {
            synchronized (seen) {
                return (int) seen.stream().filter(x -> x == s).count();
            }
        }
    }

    /** Everything one scenario opened, closed when it ends whatever happened. */
    static final class Ctx {
        final String name;
        final String namespace;
        final List<Closeable> opened = Collections.synchronizedList(new ArrayList<>());
        final List<String> notes = Collections.synchronizedList(new ArrayList<>());
        final List<String> softFailures = Collections.synchronizedList(new ArrayList<>());
        final ExecutorService pool = Executors.newCachedThreadPool(r -> {
            Thread t = new Thread(r);
            t.setDaemon(true);
            return t;
        });
        volatile Thread thread;
        volatile String step;

        Ctx(String name) {
            this.name = name;
            this.namespace = "cc-" + RUN + "-" + name;
        }

        void step(String what) {
            step = what;
        }

        void note(String what) {
            notes.add(what);
        }

        /** A check whose failure fails the scenario but lets it go on (later steps do not depend on it). */
        void softly(String what, Step check) {
            step(what);
            try {
                check.run();
            } catch (Failure f) {
                softFailures.add("[" + what + "] " + f.getMessage());
            } catch (Exception e) {
                softFailures.add("[" + what + "] unexpected " + describe(e));
            }
        }

        CuratorFramework client() throws Exception {
            return client(connect, b -> {});
        }

        CuratorFramework client(Consumer<CuratorFrameworkFactory.Builder> tweak) throws Exception {
            return client(connect, tweak);
        }

        /** A started Curator client in this scenario's namespace, connected (or the scenario fails). */
        CuratorFramework client(String connectString, Consumer<CuratorFrameworkFactory.Builder> tweak) throws Exception {
            CuratorFrameworkFactory.Builder b = CuratorFrameworkFactory.builder()
                .connectString(connectString)
                .namespace(namespace)
                .sessionTimeoutMs(SESSION_MS)
                .connectionTimeoutMs(10_000)
                .retryPolicy(new RetryNTimes(3, 200));
            tweak.accept(b);
            CuratorFramework c = b.build();
            opened.add(c);
            c.start();
            check(c.blockUntilConnected((int) WAIT_S, TimeUnit.SECONDS), "client did not connect to %s within %d s", connectString, WAIT_S);
            return c;
        }

        <T extends Closeable> T closeLater(T thing) {
            opened.add(thing);
            return thing;
        }

        Proxy proxy() throws IOException {
            return closeLater(new Proxy(connect));
        }

        <T> Future<T> background(Callable<T> task) {
            return pool.submit(task);
        }

        void close() {
            List<Closeable> all;
            synchronized (opened) {
                all = new ArrayList<>(opened);
            }
            Collections.reverse(all);
            for (Closeable c : all) {
                Thread closer = new Thread(() -> {
                    try {
                        c.close();
                    } catch (Exception ignored) {
                        // closing is best effort
                    }
                }, "close-" + name);
                closer.setDaemon(true);
                closer.start();
                try {
                    closer.join(10_000);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }
            pool.shutdownNow();
        }
    }

    /** Copies stderr through and remembers its lines, to find the client's protocol errors afterwards. */
    static final class LogTap extends OutputStream {
        final PrintStream out;
        final List<String> lines = new ArrayList<>();
        final ByteArrayOutputStream current = new ByteArrayOutputStream();

        LogTap(PrintStream out) {
            this.out = out;
        }

        @Override
        public synchronized void write(int b) {
            out.write(b);
            if (b == '\n') {
                lines.add(current.toString(StandardCharsets.UTF_8));
                current.reset();
            } else {
                current.write(b);
            }
        }

        @Override
        public synchronized void write(byte[] b, int off, int len) {
            for (int i = off; i < off + len; i++) {
                write(b[i]);
            }
        }

        @Override
        public void flush() {
            out.flush();
        }

        synchronized int mark() {
            return lines.size();
        }

        synchronized List<String> protocolErrorsSince(int mark) {
            List<String> found = new ArrayList<>();
            for (String line : lines.subList(mark, lines.size())) {
                for (String pattern : PROTOCOL_ERRORS) {
                    if (line.contains(pattern)) {
                        String trimmed = line.trim();
                        trimmed = trimmed.length() > 300 ? trimmed.substring(0, 300) + "..." : trimmed;
                        if (!found.contains(trimmed)) {
                            found.add(trimmed);
                        }
                        break;
                    }
                }
            }
            return found.size() > 3 ? new ArrayList<>(found.subList(0, 3)) : found;
        }
    }

    /** A TCP proxy in front of the server, so that a scenario can cut a client's connection or keep it out. */
    static final class Proxy implements Closeable {
        final ServerSocket listener;
        final String host;
        final int port;
        final Set<Socket> sockets = ConcurrentHashMap.newKeySet();
        volatile boolean refusing;
        volatile boolean closed;
        final AtomicInteger accepted = new AtomicInteger();

        Proxy(String target) throws IOException {
            String first = target.split(",")[0].replaceAll("/.*", "");
            int colon = first.lastIndexOf(':');
            host = first.substring(0, colon);
            port = Integer.parseInt(first.substring(colon + 1));
            listener = new ServerSocket(0, 50, InetAddress.getLoopbackAddress());
            Thread t = new Thread(this::acceptLoop, "proxy-accept");
            t.setDaemon(true);
            t.start();
        }

        String connectString() {
            return "127.0.0.1:" + listener.getLocalPort();
        }

        void acceptLoop() {
            while (!closed) {
                Socket down;
                try {
                    down = listener.accept();
                } catch (IOException e) {
                    return;
                }
                accepted.incrementAndGet();
                if (refusing) {
                    quietly(down);
                    continue;
                }
                Socket up = new Socket();
                try {
                    up.connect(new InetSocketAddress(host, port), 5000);
                    up.setTcpNoDelay(true);
                    down.setTcpNoDelay(true);
                } catch (IOException e) {
                    quietly(down);
                    quietly(up);
                    continue;
                }
                sockets.add(down);
                sockets.add(up);
                if (refusing) {
                    quietly(down);
                    quietly(up);
                    continue;
                }
                pump(down, up);
                pump(up, down);
            }
        }

        void pump(Socket from, Socket to) {
            Thread t = new Thread(() -> {
                byte[] buf = new byte[65536];
                try (InputStream in = from.getInputStream(); OutputStream out = to.getOutputStream()) {
                    int n;
                    while ((n = in.read(buf)) >= 0) {
                        out.write(buf, 0, n);
                        out.flush();
                    }
                } catch (IOException ignored) {
                    // one side went away: close both below
                } finally {
                    quietly(from);
                    quietly(to);
                    sockets.remove(from);
                    sockets.remove(to);
                }
            }, "proxy-pump");
            t.setDaemon(true);
            t.start();
        }

        /** Cut every connection and turn new ones away until resume(): the client sees the server vanish. */
        void cut() {
            refusing = true;
            for (Socket s : sockets.toArray(new Socket[0])) {
                quietly(s);
            }
        }

        void resume() {
            refusing = false;
        }

        static void quietly(Socket s) {
            try {
                s.close();
            } catch (IOException ignored) {
                // already closed
            }
        }

        @Override
        public void close() throws IOException {
            closed = true;
            listener.close();
            cut();
        }
    }

    // ---- scenarios ----------------------------------------------------------------------------

    /** create, getData, setData with the right and a stale version, delete with versions, errors. */
    static void crud(Ctx ctx) throws Exception {
        CuratorFramework c = ctx.client();
        ctx.step("create");
        checkEq("/node", c.create().forPath("/node", bytes("v1")), "create's returned path");
        expectThrows(KeeperException.NodeExistsException.class, "creating /node again", () -> c.create().forPath("/node", bytes("x")));

        ctx.step("getData");
        Stat st = new Stat();
        checkEq("v1", text(c.getData().storingStatIn(st).forPath("/node")), "getData");
        checkEq(0, st.getVersion(), "version of a new node");
        checkEq(2, st.getDataLength(), "dataLength");
        checkEq(0, st.getNumChildren(), "numChildren");
        checkEq(0L, st.getEphemeralOwner(), "ephemeralOwner of a persistent node");
        check(st.getCzxid() > 0 && st.getMzxid() == st.getCzxid(), "czxid %d / mzxid %d of a new node", st.getCzxid(), st.getMzxid());

        ctx.step("setData with the right version");
        Stat s1 = c.setData().withVersion(0).forPath("/node", bytes("v2"));
        checkEq(1, s1.getVersion(), "version after setData");
        check(s1.getMzxid() > st.getMzxid(), "mzxid did not grow: %d -> %d", st.getMzxid(), s1.getMzxid());
        checkEq(st.getCzxid(), s1.getCzxid(), "czxid after setData");

        ctx.step("setData with a stale version");
        expectThrows(KeeperException.BadVersionException.class, "setData with stale version 0",
            () -> c.setData().withVersion(0).forPath("/node", bytes("stale")));
        checkEq("v2", text(c.getData().forPath("/node")), "data after the refused setData");
        Stat s2 = c.setData().forPath("/node", bytes("")); // any version (-1), empty data
        checkEq(2, s2.getVersion(), "version after an unconditional setData");
        checkEq(0, c.getData().forPath("/node").length, "length of empty data");

        ctx.step("children");
        c.create().forPath("/node/child", bytes("c"));
        checkEq(List.of("child"), c.getChildren().forPath("/node"), "getChildren");
        Stat parent = c.checkExists().forPath("/node");
        checkEq(1, parent.getNumChildren(), "numChildren");
        checkEq(1, parent.getCversion(), "cversion after one create");
        c.create().creatingParentsIfNeeded().forPath("/deep/a/b", bytes("b"));
        checkEq("b", text(c.getData().forPath("/deep/a/b")), "data created with its parents");

        ctx.step("delete with versions");
        expectThrows(KeeperException.NotEmptyException.class, "deleting a node with children", () -> c.delete().forPath("/node"));
        expectThrows(KeeperException.BadVersionException.class, "delete with version 5", () -> c.delete().withVersion(5).forPath("/node/child"));
        c.delete().withVersion(0).forPath("/node/child");
        expectThrows(KeeperException.BadVersionException.class, "delete with stale version 0", () -> c.delete().withVersion(0).forPath("/node"));
        c.delete().withVersion(2).forPath("/node");
        check(c.checkExists().forPath("/node") == null, "/node still exists after delete");

        ctx.step("operations on a missing node");
        expectThrows(KeeperException.NoNodeException.class, "getData of a deleted node", () -> c.getData().forPath("/node"));
        expectThrows(KeeperException.NoNodeException.class, "setData of a deleted node", () -> c.setData().forPath("/node", bytes("x")));
        expectThrows(KeeperException.NoNodeException.class, "delete of a deleted node", () -> c.delete().forPath("/node"));
        expectThrows(KeeperException.NoNodeException.class, "create under a missing parent", () -> c.create().forPath("/missing/child", bytes("x")));
        c.delete().deletingChildrenIfNeeded().forPath("/deep");
        check(c.checkExists().forPath("/deep") == null, "/deep still exists after deletingChildrenIfNeeded");

        ctx.step("create2 (a create that returns the new node's stat)");
        Stat created = new Stat();
        c.create().storingStatIn(created).forPath("/with-stat", bytes("abc"));
        checkEq(3, created.getDataLength(), "dataLength in create2's stat");
        check(created.getCzxid() > s1.getMzxid(), "czxid in create2's stat: %d", created.getCzxid());
        checkEq(c.checkExists().forPath("/with-stat"), created, "create2's stat against exists()");

        ctx.step("sync");
        CountDownLatch synced = new CountDownLatch(1);
        List<String> syncResult = Collections.synchronizedList(new ArrayList<>());
        c.sync().inBackground((client, event) -> {
            syncResult.add(event.getResultCode() + " " + event.getPath());
            synced.countDown();
        }).forPath("/with-stat");
        check(synced.await(WAIT_S, TimeUnit.SECONDS), "no answer to sync within %d s", WAIT_S);
        checkEq(List.of("0 /with-stat"), syncResult, "sync's result code and path");

        ctx.softly("container parents", () -> {
            c.create().creatingParentContainersIfNeeded().forPath("/box/item", bytes("i"));
            Stat box = c.checkExists().forPath("/box");
            checkEq(0L, box.getEphemeralOwner(), "ephemeralOwner of a container (ZooKeeper 3.8 reports 0)");
            checkEq("i", text(c.getData().forPath("/box/item")), "data under a container parent");
        });
    }

    /** Sequential names, ephemeral owners, and ephemerals gone once their client closes. */
    static void sequentialEphemeral(Ctx ctx) throws Exception {
        CuratorFramework a = ctx.client();
        CuratorFramework b = ctx.client();
        a.create().forPath("/q", bytes(""));
        long session = a.getZookeeperClient().getZooKeeper().getSessionId();

        ctx.step("ephemeral-sequential creates");
        List<String> made = new ArrayList<>();
        for (int i = 0; i < 3; i++) {
            made.add(a.create().withMode(CreateMode.EPHEMERAL_SEQUENTIAL).forPath("/q/e-", bytes("x" + i)));
        }
        checkEq(List.of("/q/e-0000000000", "/q/e-0000000001", "/q/e-0000000002"), made, "ephemeral-sequential names");
        String persistent = a.create().withMode(CreateMode.PERSISTENT_SEQUENTIAL).forPath("/q/p-", bytes("p"));
        checkEq("/q/p-0000000003", persistent, "the persistent-sequential name after three children (parent's cversion)");
        Stat st = b.checkExists().forPath(made.get(0));
        check(st != null, "%s not visible to the other client", made.get(0));
        checkEq(session, st.getEphemeralOwner(), "ephemeralOwner");
        checkEq("x1", text(b.getData().forPath(made.get(1))), "data of an ephemeral-sequential node");
        expectThrows(KeeperException.NoChildrenForEphemeralsException.class, "creating a child of an ephemeral",
            () -> a.create().forPath(made.get(0) + "/kid", bytes("")));
        ctx.softly("getEphemerals and getAllChildrenNumber", () -> {
            ZooKeeper zk = a.getZookeeperClient().getZooKeeper();
            String base = "/" + ctx.namespace + "/q";
            List<String> mine = zk.getEphemerals(base);
            Collections.sort(mine);
            checkEq(List.of(base + "/e-0000000000", base + "/e-0000000001", base + "/e-0000000002"), mine, "getEphemerals");
            checkEq(4, zk.getAllChildrenNumber(base), "getAllChildrenNumber");
        });

        ctx.step("close the owner");
        Events events = new Events("child watch on /q");
        b.getChildren().usingWatcher(events.watcher()).forPath("/q");
        a.close();
        events.next("NodeChildrenChanged /q");
        checkEq(List.of("p-0000000003"), b.getChildren().forPath("/q"), "children of /q once the owner closed");
        check(b.checkExists().forPath(made.get(2)) == null, "%s outlived its session", made.get(2));
    }

    /** A transaction that commits several operations; failing ones that apply nothing. */
    static void transaction(Ctx ctx) throws Exception {
        CuratorFramework c = ctx.client();
        c.create().forPath("/t", bytes("0"));

        ctx.step("a committing transaction");
        List<CuratorTransactionResult> done = c.transaction().forOperations(
            c.transactionOp().create().forPath("/t/a", bytes("a")),
            c.transactionOp().create().withMode(CreateMode.PERSISTENT_SEQUENTIAL).forPath("/t/s-", bytes("s")),
            c.transactionOp().setData().withVersion(0).forPath("/t", bytes("1")),
            c.transactionOp().check().withVersion(1).forPath("/t"),
            c.transactionOp().create().forPath("/t/tmp", bytes("tmp")),
            c.transactionOp().delete().withVersion(0).forPath("/t/tmp"));
        checkEq(6, done.size(), "number of results");
        checkEq(OperationType.CREATE, done.get(0).getType(), "result 0 type");
        checkEq("/t/a", done.get(0).getResultPath(), "result 0 path");
        check(done.get(1).getResultPath() != null && done.get(1).getResultPath().matches("/t/s-\\d{10}"), "sequential path in a transaction: %s", done.get(1).getResultPath());
        checkEq(OperationType.SET_DATA, done.get(2).getType(), "result 2 type");
        checkEq(1, done.get(2).getResultStat().getVersion(), "version in setData's result");
        checkEq(OperationType.CHECK, done.get(3).getType(), "result 3 type");
        checkEq(OperationType.DELETE, done.get(5).getType(), "result 5 type");
        Stat st = new Stat();
        checkEq("1", text(c.getData().storingStatIn(st).forPath("/t")), "data of /t after commit");
        checkEq(1, st.getVersion(), "version of /t after commit");
        checkEq("a", text(c.getData().forPath("/t/a")), "data of /t/a after commit");
        check(c.checkExists().forPath("/t/tmp") == null, "/t/tmp was created and deleted in the transaction, yet exists");
        List<String> before = c.getChildren().forPath("/t");
        Collections.sort(before);

        ctx.step("a transaction failing on a check");
        KeeperException.BadVersionException bad = expectThrows(KeeperException.BadVersionException.class, "transaction with check version 99",
            () -> c.transaction().forOperations(
                c.transactionOp().create().forPath("/t/b", bytes("b")),
                c.transactionOp().setData().forPath("/t/a", bytes("changed")),
                c.transactionOp().check().withVersion(99).forPath("/t"),
                c.transactionOp().create().forPath("/t/c", bytes("c"))));
        List<Integer> codes = new ArrayList<>();
        for (OpResult r : bad.getResults()) {
            codes.add(r instanceof OpResult.ErrorResult ? ((OpResult.ErrorResult) r).getErr() : 999);
        }
        checkEq(List.of(0, 0, KeeperException.Code.BADVERSION.intValue(), KeeperException.Code.RUNTIMEINCONSISTENCY.intValue()),
            codes, "per-operation error codes of the failed transaction");
        verifyUntouched(c, before);

        ctx.step("a transaction failing on a stale setData version");
        expectThrows(KeeperException.BadVersionException.class, "transaction with a stale setData version",
            () -> c.transaction().forOperations(
                c.transactionOp().delete().forPath("/t/a"),
                c.transactionOp().setData().withVersion(0).forPath("/t", bytes("stale"))));
        verifyUntouched(c, before);

        ctx.step("a transaction failing on its last operation (NoNode)");
        expectThrows(KeeperException.NoNodeException.class, "transaction deleting a missing node",
            () -> c.transaction().forOperations(
                c.transactionOp().create().forPath("/t/d", bytes("d")),
                c.transactionOp().setData().forPath("/t", bytes("x")),
                c.transactionOp().delete().forPath("/t/missing")));
        verifyUntouched(c, before);
    }

    static void verifyUntouched(CuratorFramework c, List<String> childrenBefore) throws Exception {
        List<String> now = c.getChildren().forPath("/t");
        Collections.sort(now);
        checkEq(childrenBefore, now, "children of /t after a failed transaction");
        Stat st = new Stat();
        checkEq("1", text(c.getData().storingStatIn(st).forPath("/t")), "data of /t after a failed transaction");
        checkEq(1, st.getVersion(), "version of /t after a failed transaction");
        Stat sa = new Stat();
        checkEq("a", text(c.getData().storingStatIn(sa).forPath("/t/a")), "data of /t/a after a failed transaction");
        checkEq(0, sa.getVersion(), "version of /t/a after a failed transaction");
    }

    /** InterProcessMutex: the second client waits until the first releases. */
    static void mutex(Ctx ctx) throws Exception {
        CuratorFramework a = ctx.client();
        CuratorFramework b = ctx.client();
        InterProcessMutex la = new InterProcessMutex(a, "/lock");
        InterProcessMutex lb = new InterProcessMutex(b, "/lock");

        ctx.step("first client acquires (re-entrant)");
        check(la.acquire(WAIT_S, TimeUnit.SECONDS), "a could not take a free lock");
        check(la.acquire(WAIT_S, TimeUnit.SECONDS), "a could not re-enter its own lock");
        la.release();
        check(la.isAcquiredInThisProcess(), "a lost the lock after one of two releases");

        ctx.step("second client times out while the first holds the lock");
        check(!lb.acquire(300, TimeUnit.MILLISECONDS), "b took the lock while a held it");

        ctx.step("second client blocks, then gets the lock on release");
        CountDownLatch bGot = new CountDownLatch(1);
        CountDownLatch bMayRelease = new CountDownLatch(1);
        Future<Boolean> bHolder = ctx.background(() -> {
            if (!lb.acquire(WAIT_S * 2, TimeUnit.SECONDS)) {
                return false;
            }
            bGot.countDown();
            bMayRelease.await();
            lb.release(); // a mutex is released by the thread that holds it
            return true;
        });
        waitUntil("b's lock node to queue behind a's", WAIT_S, () -> la.getParticipantNodes().size() == 2);
        check(bGot.getCount() == 1, "b got the lock while a still held it");
        la.release();
        check(bGot.await(WAIT_S, TimeUnit.SECONDS), "b did not get the lock within %d s of a's release", WAIT_S);
        check(!la.acquire(300, TimeUnit.MILLISECONDS), "a re-took the lock while b held it");
        bMayRelease.countDown();
        check(within("b's release", WAIT_S, bHolder), "b's acquire failed");
        check(la.acquire(WAIT_S, TimeUnit.SECONDS), "a could not take the lock after b released it");
        la.release();
        waitUntil("no lock nodes left", WAIT_S, () -> la.getParticipantNodes().isEmpty());
    }

    /** Two LeaderLatches: one leader; when it closes, the other takes over. */
    static void leaderLatch(Ctx ctx) throws Exception {
        CuratorFramework a = ctx.client();
        CuratorFramework b = ctx.client();
        LeaderLatch la = ctx.closeLater(new LeaderLatch(a, "/leader", "A"));
        LeaderLatch lb = ctx.closeLater(new LeaderLatch(b, "/leader", "B"));
        CountDownLatch bElected = new CountDownLatch(1);
        CountDownLatch aElected = new CountDownLatch(1);
        la.addListener(listener(aElected));
        lb.addListener(listener(bElected));

        ctx.step("elect");
        la.start();
        check(la.await(WAIT_S, TimeUnit.SECONDS), "the first latch did not become leader");
        lb.start();
        waitUntil("both participants", WAIT_S, () -> la.getParticipants().size() == 2);
        check(!lb.hasLeadership(), "two leaders at once");
        checkEq("A", lb.getLeader().getId(), "leader as the second latch sees it");
        checkEq("A", la.getLeader().getId(), "leader as the first latch sees it");
        check(aElected.getCount() == 0, "isLeader() was not called on the leader");

        ctx.step("hand over");
        la.close();
        check(lb.await(WAIT_S, TimeUnit.SECONDS), "the second latch did not take over within %d s", WAIT_S);
        check(bElected.await(WAIT_S, TimeUnit.SECONDS), "isLeader() was not called on the new leader");
        checkEq(1, lb.getParticipants().size(), "participants after hand-over");
        checkEq("B", lb.getLeader().getId(), "leader after hand-over");
    }

    static LeaderLatchListener listener(CountDownLatch elected) {
        return new LeaderLatchListener() {
            @Override
            public void isLeader() {
                elected.countDown();
            }

            @Override
            public void notLeader() {
            }
        };
    }

    /** CuratorCache (a persistent recursive watch, addWatch): initial data, then create/change/delete events. */
    static void curatorCache(Ctx ctx) throws Exception {
        CuratorFramework c = ctx.client();
        CuratorFramework writer = ctx.client();
        c.create().creatingParentsIfNeeded().forPath("/cache/pre", bytes("p"));
        Events events = new Events("CuratorCache");
        CuratorCache cache = ctx.closeLater(CuratorCache.build(c, "/cache"));
        cache.listenable().addListener(CuratorCacheListener.builder()
            .forCreates(n -> events.add("create " + n.getPath() + "=" + text(n.getData())))
            .forChanges((old, n) -> events.add("change " + n.getPath() + "=" + text(n.getData())))
            .forDeletes(old -> events.add("delete " + old.getPath()))
            .forInitialized(() -> events.add("initialized"))
            .build());

        ctx.step("initial load");
        cache.start();
        events.next("create /cache=");
        events.next("create /cache/pre=p");
        events.next("initialized");
        checkEq("p", cache.get("/cache/pre").map(ChildData::getData).map(CuratorCheck::text).orElse(null), "cached data of /cache/pre");

        ctx.step("events from another client");
        writer.create().forPath("/cache/x", bytes("1"));
        events.next("create /cache/x=1");
        writer.setData().forPath("/cache/x", bytes("2"));
        events.next("change /cache/x=2");
        writer.create().forPath("/cache/x/y", bytes("deep"));
        events.next("create /cache/x/y=deep");
        writer.delete().forPath("/cache/x/y");
        events.next("delete /cache/x/y");
        writer.delete().forPath("/cache/x");
        events.next("delete /cache/x");
        checkEq(2, cache.size(), "cache size at the end (/cache and /cache/pre)");
    }

    /** DistributedAtomicLong incremented from two clients at once: no increment lost. */
    static void atomicLong(Ctx ctx) throws Exception {
        CuratorFramework a = ctx.client();
        CuratorFramework b = ctx.client();
        int perClient = 25;
        DistributedAtomicLong ca = new DistributedAtomicLong(a, "/counter", new RetryNTimes(50, 10));
        DistributedAtomicLong cb = new DistributedAtomicLong(b, "/counter", new RetryNTimes(50, 10));
        ctx.step("concurrent increments");
        List<Future<Integer>> runs = new ArrayList<>();
        for (DistributedAtomicLong counter : List.of(ca, cb)) {
            runs.add(ctx.background(() -> {
                int conflicts = 0;
                for (int done = 0; done < perClient; ) {
                    AtomicValue<Long> v = counter.increment();
                    if (v.succeeded()) {
                        check(v.postValue() == v.preValue() + 1, "increment went from %d to %d", v.preValue(), v.postValue());
                        done++;
                    } else {
                        conflicts++;
                    }
                }
                return conflicts;
            }));
        }
        int conflicts = 0;
        for (Future<Integer> run : runs) {
            conflicts += within("increments", WAIT_S * 2, run);
        }
        ctx.note(conflicts + " increments gave up after their retries and were tried again");
        AtomicValue<Long> total = cb.get();
        check(total.succeeded(), "get() did not succeed");
        checkEq((long) 2 * perClient, total.postValue(), "counter after both clients");

        ctx.step("compareAndSet");
        check(ca.compareAndSet(50L, 100L).succeeded(), "compareAndSet(50, 100) failed");
        check(!cb.compareAndSet(50L, 7L).succeeded(), "compareAndSet with a stale expected value succeeded");
        checkEq(100L, cb.get().postValue(), "counter after compareAndSet");
    }

    /** InterProcessSemaphoreV2 with two leases and three clients: the third waits for a lease to come back. */
    static void semaphore(Ctx ctx) throws Exception {
        List<InterProcessSemaphoreV2> sems = new ArrayList<>();
        for (int i = 0; i < 3; i++) {
            sems.add(new InterProcessSemaphoreV2(ctx.client(), "/sem", 2));
        }
        ctx.step("two leases taken");
        Lease first = sems.get(0).acquire(WAIT_S, TimeUnit.SECONDS);
        Lease second = sems.get(1).acquire(WAIT_S, TimeUnit.SECONDS);
        check(first != null && second != null, "the two leases were not granted");
        check(sems.get(2).acquire(300, TimeUnit.MILLISECONDS) == null, "a third lease was granted out of two");
        ctx.step("the third client waits, then gets a returned lease");
        Future<Lease> third = ctx.background(() -> sems.get(2).acquire(WAIT_S * 2, TimeUnit.SECONDS));
        waitUntil("the third client's lease node", WAIT_S, () -> sems.get(0).getParticipantNodes().size() == 3);
        check(!third.isDone(), "the third client got a lease while both were taken");
        sems.get(0).returnLease(first);
        Lease got = within("the third client's lease", WAIT_S, third);
        check(got != null, "the third client got no lease after one came back");
        sems.get(1).returnLease(second);
        sems.get(2).returnLease(got);
        waitUntil("every lease returned", WAIT_S, () -> sems.get(0).getParticipantNodes().isEmpty());
    }

    /** SharedCount: a change by one client reaches the other's listener; a stale trySetCount is refused. */
    static void sharedCount(Ctx ctx) throws Exception {
        SharedCount ca = ctx.closeLater(new SharedCount(ctx.client(), "/count", 7));
        SharedCount cb = ctx.closeLater(new SharedCount(ctx.client(), "/count", 7));
        BlockingQueue<Integer> seenByB = new LinkedBlockingQueue<>();
        cb.addListener(new SharedCountListener() {
            @Override
            public void countHasChanged(SharedCountReader reader, int value) {
                seenByB.add(value);
            }

            @Override
            public void stateChanged(CuratorFramework client, ConnectionState state) {
            }
        });
        ctx.step("start");
        ca.start();
        cb.start();
        checkEq(7, cb.getCount(), "initial count");
        ctx.step("a change reaches the other client");
        VersionedValue<Integer> before = ca.getVersionedValue();
        ca.setCount(8);
        checkEq(8, seenByB.poll(WAIT_S, TimeUnit.SECONDS), "count seen by the other client's listener");
        checkEq(8, cb.getCount(), "count read by the other client");
        ctx.step("compare-and-set");
        check(!cb.trySetCount(before, 99), "trySetCount with a stale version succeeded");
        check(cb.trySetCount(cb.getVersionedValue(), 9), "trySetCount with the current version failed");
        waitUntil("the first client to see 9", WAIT_S, () -> ca.getCount() == 9);
    }

    /** DistributedBarrier: a waiter is held until another client removes the barrier. */
    static void barrier(Ctx ctx) throws Exception {
        CuratorFramework a = ctx.client();
        CuratorFramework b = ctx.client();
        DistributedBarrier ba = new DistributedBarrier(a, "/barrier");
        DistributedBarrier bb = new DistributedBarrier(b, "/barrier");
        ctx.step("set the barrier");
        ba.setBarrier();
        check(!bb.waitOnBarrier(300, TimeUnit.MILLISECONDS), "passed a barrier that is set");
        ctx.step("remove it while the other waits");
        Future<Boolean> waiter = ctx.background(() -> bb.waitOnBarrier(WAIT_S * 2, TimeUnit.SECONDS));
        expectThrows(TimeoutException.class, "the waiter passed a barrier that is set", () -> waiter.get(300, TimeUnit.MILLISECONDS));
        ba.removeBarrier();
        check(within("the waiter to pass", WAIT_S, waiter), "the waiter did not pass once the barrier was removed");
        check(bb.waitOnBarrier(1, TimeUnit.SECONDS), "a removed barrier still holds");
    }

    /** DistributedDoubleBarrier with two members: nobody enters alone, both leave together. */
    static void doubleBarrier(Ctx ctx) throws Exception {
        CuratorFramework a = ctx.client();
        CuratorFramework b = ctx.client();
        DistributedDoubleBarrier da = new DistributedDoubleBarrier(a, "/double", 2);
        DistributedDoubleBarrier db = new DistributedDoubleBarrier(b, "/double", 2);
        ctx.step("enter");
        Future<Boolean> aEnters = ctx.background(() -> da.enter(WAIT_S * 2, TimeUnit.SECONDS));
        waitUntil("the first member's node", WAIT_S, () -> {
            return b.checkExists().forPath("/double") != null && !b.getChildren().forPath("/double").isEmpty();
        });
        check(!aEnters.isDone(), "the first member entered alone");
        check(db.enter(WAIT_S, TimeUnit.SECONDS), "the second member could not enter");
        check(within("the first member to enter", WAIT_S, aEnters), "the first member's enter() failed");
        ctx.step("leave");
        Future<Boolean> aLeaves = ctx.background(() -> da.leave(WAIT_S * 2, TimeUnit.SECONDS));
        check(db.leave(WAIT_S, TimeUnit.SECONDS), "the second member could not leave");
        check(within("the first member to leave", WAIT_S, aLeaves), "the first member's leave() failed");
        waitUntil("an empty barrier", WAIT_S, () -> b.getChildren().forPath("/double").isEmpty());
    }

    /** A node with a digest ACL: refused without auth or with a wrong password, allowed with user:pass. */
    static void digestAcl(Ctx ctx) throws Exception {
        String digest = DigestAuthenticationProvider.generateDigest("user:pass");
        List<ACL> acl = List.of(new ACL(ZooDefs.Perms.ALL, new Id("digest", digest)));
        CuratorFramework owner = ctx.client(b -> b.authorization("digest", bytes("user:pass")));
        CuratorFramework anon = ctx.client();
        CuratorFramework wrong = ctx.client(b -> b.authorization("digest", bytes("user:wrong")));
        CuratorFramework friend = ctx.client(b -> b.authorization("digest", bytes("user:pass")));

        ctx.step("create with a digest ACL");
        owner.create().withACL(acl).forPath("/secret", bytes("s"));
        checkEq(acls(acl), acls(friend.getACL().forPath("/secret")), "getACL by an authorised client");

        ctx.step("client without auth");
        check(anon.checkExists().forPath("/secret") != null, "exists() needs no permission, yet found nothing");
        expectThrows(KeeperException.NoAuthException.class, "getData without auth", () -> anon.getData().forPath("/secret"));
        expectThrows(KeeperException.NoAuthException.class, "setData without auth", () -> anon.setData().forPath("/secret", bytes("x")));
        expectThrows(KeeperException.NoAuthException.class, "getChildren without auth", () -> anon.getChildren().forPath("/secret"));
        expectThrows(KeeperException.NoAuthException.class, "create a child without auth", () -> anon.create().forPath("/secret/kid", bytes("")));

        ctx.step("client with the wrong password");
        expectThrows(KeeperException.NoAuthException.class, "getData with user:wrong", () -> wrong.getData().forPath("/secret"));

        ctx.step("client with user:pass");
        checkEq("s", text(friend.getData().forPath("/secret")), "getData with auth");
        friend.setData().forPath("/secret", bytes("s2"));
        friend.create().forPath("/secret/kid", bytes("k"));
        friend.delete().forPath("/secret/kid");
        checkEq("s2", text(owner.getData().forPath("/secret")), "data after the friend's setData");

        ctx.step("CREATOR_ALL_ACL");
        friend.create().withACL(ZooDefs.Ids.CREATOR_ALL_ACL).forPath("/mine", bytes("m"));
        checkEq(acls(acl), acls(friend.getACL().forPath("/mine")), "ACL of a node created with CREATOR_ALL_ACL");
        expectThrows(KeeperException.NoAuthException.class, "getData of a creator-only node without auth", () -> anon.getData().forPath("/mine"));

        ctx.step("auth added to a live session");
        anon.getZookeeperClient().getZooKeeper().addAuthInfo("digest", bytes("user:pass"));
        checkEq("s2", text(anon.getData().forPath("/secret")), "getData after addAuthInfo");

        ctx.step("setACL");
        expectThrows(KeeperException.BadVersionException.class, "setACL with a stale version",
            () -> friend.setACL().withVersion(5).withACL(ZooDefs.Ids.OPEN_ACL_UNSAFE).forPath("/secret"));
        Stat st = friend.setACL().withVersion(0).withACL(ZooDefs.Ids.READ_ACL_UNSAFE).forPath("/secret");
        checkEq(1, st.getAversion(), "aversion after setACL");
        checkEq("s2", text(wrong.getData().forPath("/secret")), "getData by anyone once the ACL is world:anyone READ");
        expectThrows(KeeperException.NoAuthException.class, "setData under a READ-only ACL", () -> friend.setData().forPath("/secret", bytes("x")));

        ctx.softly("getACL without READ or ADMIN", () -> expectThrows(KeeperException.NoAuthException.class,
            "getACL of a creator-only node by a client without auth (ZooKeeper 3.8 asks for READ or ADMIN)", () -> wrong.getACL().forPath("/mine")));

        ctx.softly("getACL with READ but not ADMIN", () -> {
            List<ACL> mixed = List.of(new ACL(ZooDefs.Perms.ALL, new Id("digest", digest)), new ACL(ZooDefs.Perms.READ, ZooDefs.Ids.ANYONE_ID_UNSAFE));
            friend.create().withACL(mixed).forPath("/mixed", bytes("m"));
            checkEq(acls(mixed), acls(friend.getACL().forPath("/mixed")), "getACL with ADMIN");
            List<ACL> redacted = List.of(new ACL(ZooDefs.Perms.ALL, new Id("digest", "user:x")), new ACL(ZooDefs.Perms.READ, ZooDefs.Ids.ANYONE_ID_UNSAFE));
            checkEq(acls(redacted), acls(wrong.getACL().forPath("/mixed")), "getACL by a client with READ only (ZooKeeper 3.8 hides digest hashes from it)");
        });
    }

    /** A second handle on the same session id and password closes it: the ephemeral goes, the first client sees expiry. */
    static void sessionExpiry(Ctx ctx) throws Exception {
        CuratorFramework a = ctx.client(b -> b.sessionTimeoutMs(10_000));
        States states = new States("client a", a);
        CuratorFramework b = ctx.client();
        ZooKeeper zk = a.getZookeeperClient().getZooKeeper();
        long session = zk.getSessionId();
        byte[] password = zk.getSessionPasswd();
        a.create().withMode(CreateMode.EPHEMERAL).forPath("/eph", bytes("e"));
        Events events = new Events("exists watch on /eph");
        check(b.checkExists().usingWatcher(events.watcher()).forPath("/eph") != null, "/eph not visible to the other client");

        ctx.step("second handle on the session");
        CountDownLatch connected = new CountDownLatch(1);
        ZooKeeper twin = new ZooKeeper(connect, 10_000, e -> {
            if (e.getState() == Watcher.Event.KeeperState.SyncConnected) {
                connected.countDown();
            }
        }, session, password);
        try {
            check(connected.await(WAIT_S, TimeUnit.SECONDS), "the second handle did not connect with the session's id and password");
            checkEq(session, twin.getSessionId(), "the second handle's session id");
        } finally {
            ctx.step("close the second handle (closeSession)");
            twin.close();
        }

        ctx.step("ephemeral removed");
        events.next("NodeDeleted /eph");
        long lastChildGone = System.nanoTime();
        check(b.checkExists().forPath("/eph") == null, "/eph outlived its session");
        // Watch the namespace node itself (a container Curator made; /eph was its only child).
        ZooKeeper raw = b.getZookeeperClient().getZooKeeper();
        AtomicLong reaped = new AtomicLong();
        Stat namespaceStat = raw.exists("/" + ctx.namespace, e -> {
            if (e.getType() == Watcher.Event.EventType.NodeDeleted) {
                reaped.set(System.nanoTime());
            }
        });

        ctx.step("first client sees its session expire and starts a new one");
        states.await(ConnectionState.LOST, 30);
        states.await(ConnectionState.RECONNECTED, 30);
        long renewed = a.getZookeeperClient().getZooKeeper().getSessionId();
        check(renewed != session, "still on session 0x%x after expiry", session);
        // The namespace is a container that Curator created once and does not re-create; its last
        // child just went. ZooKeeper reaps empty containers on its container manager's round
        // (znode.container.checkIntervalMs, 60 s by default), so it is still there.
        if (namespaceStat == null || raw.exists("/" + ctx.namespace, false) == null) {
            String when = reaped.get() != 0
                ? String.format("%.2f s after", (reaped.get() - lastChildGone) / 1e9)
                : "as soon as";
            throw new Failure(String.format("the namespace node /%s, a container Curator created, was reaped %s its last child went; "
                + "ZooKeeper's container manager first looks 60 s after start and then every 60 s (znode.container.checkIntervalMs), "
                + "and Curator ensures its namespace once per client, so this client's creates now fail with NoNode",
                ctx.namespace, when));
        }
        a.create().withMode(CreateMode.EPHEMERAL).forPath("/eph", bytes("again"));
        checkEq(renewed, b.checkExists().forPath("/eph").getEphemeralOwner(), "owner of the ephemeral created on the new session");
    }

    /** A client that goes silent: the server expires its session after the timeout and removes its ephemeral. */
    static void sessionTimeout(Ctx ctx) throws Exception {
        Proxy proxy = ctx.proxy();
        CuratorFramework a = ctx.client(proxy.connectString(), b -> b.sessionTimeoutMs(4_000));
        States states = new States("client a", a);
        CuratorFramework b = ctx.client();
        ZooKeeper zk = a.getZookeeperClient().getZooKeeper();
        long session = zk.getSessionId();
        int negotiated = zk.getSessionTimeout();
        ctx.note("negotiated session timeout " + negotiated + " ms (asked for 4000)");
        a.create().withMode(CreateMode.EPHEMERAL).forPath("/silent", bytes(""));
        Events events = new Events("exists watch on /silent");
        check(b.checkExists().usingWatcher(events.watcher()).forPath("/silent") != null, "/silent not visible to the other client");

        ctx.step("cut the client off");
        long cut = System.nanoTime();
        proxy.cut();
        events.next("NodeDeleted /silent", negotiated * 3L / 1000 + 10);
        long tookMs = (System.nanoTime() - cut) / 1_000_000;
        ctx.note("ephemeral removed " + tookMs + " ms after the client went silent");
        check(tookMs >= negotiated / 2, "the session expired after %d ms, before half its %d ms timeout", tookMs, negotiated);
        check(tookMs <= negotiated * 3L + 5_000, "the session expired only after %d ms (timeout %d ms)", tookMs, negotiated);

        ctx.step("let the client back");
        proxy.resume();
        states.await(ConnectionState.LOST, 30);
        states.await(ConnectionState.RECONNECTED, 30);
        check(a.getZookeeperClient().getZooKeeper().getSessionId() != session, "still on the old session after it expired");
        check(a.checkExists().forPath("/silent") == null, "/silent is back");
    }

    /** One-shot watches survive a dropped connection: setWatches on reconnect fires what was missed and keeps the rest. */
    static void watchReconnect(Ctx ctx) throws Exception {
        Proxy proxy = ctx.proxy();
        CuratorFramework a = ctx.client(proxy.connectString(), b -> {});
        States states = new States("client a", a);
        CuratorFramework b = ctx.client();
        b.create().forPath("/w", bytes("0"));
        b.create().forPath("/w-del", bytes("0"));
        b.create().forPath("/w2", bytes(""));
        long session = a.getZookeeperClient().getZooKeeper().getSessionId();

        ctx.step("set watches");
        Events data = new Events("data watch on /w");
        Events deleted = new Events("data watch on /w-del");
        Events exists = new Events("exists watch on /w-new");
        Events children = new Events("child watch on /w2");
        a.getData().usingWatcher(data.watcher()).forPath("/w");
        a.getData().usingWatcher(deleted.watcher()).forPath("/w-del");
        check(a.checkExists().usingWatcher(exists.watcher()).forPath("/w-new") == null, "/w-new exists already");
        a.getChildren().usingWatcher(children.watcher()).forPath("/w2");

        ctx.step("drop the connection and change nodes meanwhile");
        proxy.cut();
        states.await(ConnectionState.SUSPENDED, WAIT_S);
        b.setData().forPath("/w", bytes("1"));
        b.delete().forPath("/w-del");
        b.create().forPath("/w-new", bytes("n"));

        ctx.step("reconnect (setWatches)");
        proxy.resume();
        states.await(ConnectionState.RECONNECTED, WAIT_S);
        checkEq(session, a.getZookeeperClient().getZooKeeper().getSessionId(), "session after the reconnect");
        data.next("NodeDataChanged /w");
        deleted.next("NodeDeleted /w-del");
        exists.next("NodeCreated /w-new");
        children.none("before /w2 changed");

        ctx.step("the re-registered child watch fires");
        b.create().forPath("/w2/kid", bytes(""));
        children.next("NodeChildrenChanged /w2");

        ctx.step("the connection stays up after the reconnect");
        for (int i = 0; i < 20; i++) {
            checkEq("1", text(a.getData().forPath("/w")), "getData after the reconnect");
        }
        stayedUp(states);
    }

    /** A persistent recursive watch (addWatch): events below it, kept across a reconnect (setWatches2), removable. */
    static void persistentWatch(Ctx ctx) throws Exception {
        Proxy proxy = ctx.proxy();
        CuratorFramework a = ctx.client(proxy.connectString(), b -> {});
        States states = new States("client a", a);
        CuratorFramework b = ctx.client();
        b.create().forPath("/pw", bytes(""));
        long session = a.getZookeeperClient().getZooKeeper().getSessionId();
        Events events = new Events("persistent recursive watch on /pw");
        Watcher watcher = events.watcher();

        ctx.step("addWatch PERSISTENT_RECURSIVE");
        a.watchers().add().withMode(AddWatchMode.PERSISTENT_RECURSIVE).usingWatcher(watcher).forPath("/pw");

        ctx.step("events below the watched node");
        b.create().forPath("/pw/a", bytes("1"));
        events.next("NodeCreated /pw/a");
        b.setData().forPath("/pw/a", bytes("2"));
        events.next("NodeDataChanged /pw/a");
        b.create().forPath("/pw/a/b", bytes(""));
        events.next("NodeCreated /pw/a/b");
        b.delete().forPath("/pw/a/b");
        events.next("NodeDeleted /pw/a/b");
        b.setData().forPath("/pw/a", bytes("3"));
        events.next("NodeDataChanged /pw/a"); // still there: a persistent watch does not fire once and go

        ctx.step("drop the connection");
        proxy.cut();
        states.await(ConnectionState.SUSPENDED, WAIT_S);
        proxy.resume();
        states.await(ConnectionState.RECONNECTED, WAIT_S);
        checkEq(session, a.getZookeeperClient().getZooKeeper().getSessionId(), "session after the reconnect");

        ctx.step("the watch is back after the reconnect (setWatches2)");
        b.create().forPath("/pw/c", bytes(""));
        events.next("NodeCreated /pw/c");

        ctx.step("removeWatches");
        // removeAll: Curator 5.4's remove(watcher) does not find a watcher it wrapped for addWatch under a namespace
        a.watchers().removeAll().ofType(Watcher.WatcherType.Any).forPath("/pw");
        events.next("PersistentWatchRemoved /pw");
        b.create().forPath("/pw/d", bytes(""));
        // Events reach a connection in order: once a later one-shot watch has fired, a /pw/d event would have come.
        Events marker = new Events("data watch on /pw-marker");
        b.create().forPath("/pw-marker", bytes(""));
        a.getData().usingWatcher(marker.watcher()).forPath("/pw-marker");
        b.setData().forPath("/pw-marker", bytes("x"));
        marker.next("NodeDataChanged /pw-marker");
        events.none("after the watch was removed");
        stayedUp(states);
    }

    /** One disconnect (ours) and one reconnect, no more: the client did not drop the connection again. */
    static void stayedUp(States states) {
        List<ConnectionState> seen;
        synchronized (states.seen) {
            seen = new ArrayList<>(states.seen);
        }
        seen.remove(ConnectionState.CONNECTED); // the first connection's state may reach a listener added after it
        checkEq(List.of(ConnectionState.SUSPENDED, ConnectionState.RECONNECTED), seen,
            "connection states of the client since it connected (one cut by the proxy)");
    }
}

package org.minicpmvedge.app

import android.app.Activity
import android.content.ClipData
import android.content.Intent
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.net.Uri
import android.os.Build
import android.os.Bundle
import android.os.Handler
import android.os.Looper
import android.provider.MediaStore
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.ScrollView
import android.widget.TextView
import org.minicpmvedge.core.DeviceFacts
import org.minicpmvedge.core.DeviceReportBuilder
import org.minicpmvedge.core.Exif
import org.minicpmvedge.core.ImagePixels
import org.minicpmvedge.core.PromptBuilder
import org.minicpmvedge.core.ReportRun
import org.minicpmvedge.core.ReportSettings
import org.minicpmvedge.core.Slicing
import java.io.File
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * The chat screen: pick or take a photo, type a question (English or Chinese), Send; the answer
 * streams in with TTFT and decode tokens/s. Benchmark times [BENCH_RUNS] turns on the current photo
 * and writes the device report that `minicpmv-edge bench --device-report` checks.
 *
 * Framework widgets only (android.app.Activity, API 23). All model work runs on one worker thread;
 * the app's share of a turn is the core's (EXIF, slicing, prompt layout), the rest is [Runner].
 */
class MainActivity : Activity() {
    private lateinit var status: TextView
    private lateinit var photoView: ImageView
    private lateinit var question: EditText
    private lateinit var answer: TextView
    private lateinit var answerScroll: ScrollView
    private lateinit var stats: TextView
    private lateinit var actionButtons: List<Button>
    private lateinit var stopButton: Button

    private val main = Handler(Looper.getMainLooper())
    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private val runner: Runner = ExecuTorchLlmRunner()

    // Touched on the worker thread only.
    private var bundle: BundleInfo? = null
    private var prompts: PromptBuilder? = null

    // Touched on the UI thread only.
    private var photo: Photo? = null

    /** A photo as picked: its bytes (the benchmark decodes them again) and the upright pixels. */
    private class Photo(
        val name: String,
        val bytes: ByteArray,
        val pixels: ImagePixels,
        val decodeMs: Double,
    )

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        status = findViewById(R.id.status) as TextView
        photoView = findViewById(R.id.photo) as ImageView
        question = findViewById(R.id.question) as EditText
        answer = findViewById(R.id.answer) as TextView
        answerScroll = findViewById(R.id.answer_scroll) as ScrollView
        stats = findViewById(R.id.stats) as TextView
        val pick = findViewById(R.id.pick) as Button
        val capture = findViewById(R.id.capture) as Button
        val send = findViewById(R.id.send) as Button
        val bench = findViewById(R.id.benchmark) as Button
        stopButton = findViewById(R.id.stop) as Button
        actionButtons = listOf(pick, capture, send, bench)

        pick.setOnClickListener { pickPhoto() }
        capture.setOnClickListener { takePhoto() }
        send.setOnClickListener { send() }
        bench.setOnClickListener { benchmark() }
        stopButton.setOnClickListener { runner.stop() }
        loadBundle()
    }

    override fun onDestroy() {
        runner.stop()
        worker.execute { runner.close() }
        worker.shutdown()
        super.onDestroy()
    }

    // ---- bundle -----------------------------------------------------------------------------

    private fun loadBundle() {
        val roots = BundleInfo.searchRoots(getExternalFilesDir(null), filesDir)
        setBusy(true)
        worker.execute {
            val problems = ArrayList<String>()
            val found = BundleInfo.find(roots, problems)
            if (found == null) {
                val where = roots.joinToString("\n") { it.path } + problems.joinToString("") { "\n$it" }
                ui { status.text = getString(R.string.no_bundle, where) }
                ui { setBusy(false) }
                return@execute
            }
            ui { status.text = getString(R.string.loading_bundle, found.name) }
            try {
                prompts = found.promptBuilder()
                runner.load(found)
                bundle = found
                ui { status.text = getString(R.string.bundle_ready, found.name, found.manifest.family, found.manifest.quantization) }
            } catch (e: Exception) {
                ui { status.text = getString(R.string.error_prefix, "${found.name}: ${e.message}") }
            }
            ui { setBusy(false) }
        }
    }

    // ---- photos -----------------------------------------------------------------------------

    private fun pickPhoto() {
        val intent = Intent(Intent.ACTION_GET_CONTENT).setType("image/*").addCategory(Intent.CATEGORY_OPENABLE)
        startActivityForResult(Intent.createChooser(intent, getString(R.string.pick_photo)), REQUEST_PICK)
    }

    private fun takePhoto() {
        val uri = CaptureProvider.PHOTO_URI
        val intent =
            Intent(MediaStore.ACTION_IMAGE_CAPTURE)
                .putExtra(MediaStore.EXTRA_OUTPUT, uri)
                .addFlags(Intent.FLAG_GRANT_WRITE_URI_PERMISSION or Intent.FLAG_GRANT_READ_URI_PERMISSION)
        // API 21+ grants through ClipData; the flags alone cover older versions.
        intent.clipData = ClipData.newRawUri("", uri)
        if (intent.resolveActivity(packageManager) == null) {
            status.text = getString(R.string.no_camera)
            return
        }
        CaptureProvider.photoFile(this).delete()
        startActivityForResult(intent, REQUEST_CAPTURE)
    }

    override fun onActivityResult(
        requestCode: Int,
        resultCode: Int,
        data: Intent?,
    ) {
        super.onActivityResult(requestCode, resultCode, data)
        if (resultCode != RESULT_OK) return
        val uri: Uri =
            when (requestCode) {
                REQUEST_PICK -> data?.data ?: return
                REQUEST_CAPTURE -> CaptureProvider.PHOTO_URI
                else -> return
            }
        val name = if (requestCode == REQUEST_CAPTURE) "camera.jpg" else (uri.lastPathSegment ?: "photo")
        worker.execute {
            try {
                val bytes = contentResolver.openInputStream(uri)?.use { it.readBytes() } ?: throw IllegalStateException("cannot open $uri")
                val (pixels, ms) = decodeUpright(bytes)
                val preview = previewBitmap(pixels)
                ui {
                    photo = Photo(name, bytes, pixels, ms)
                    photoView.setImageBitmap(preview)
                    stats.text = "${pixels.width}x${pixels.height} · decode ${"%.0f".format(ms)} ms"
                }
            } catch (e: Exception) {
                ui { status.text = getString(R.string.error_prefix, e.message ?: e.toString()) }
            }
        }
    }

    // ---- chat -------------------------------------------------------------------------------

    private fun send() {
        val text = question.text.toString()
        if (text.isBlank()) return
        val current = photo
        answer.text = ""
        stats.text = ""
        setBusy(true, stoppable = true)
        worker.execute {
            try {
                val result = turn(current?.pixels, text, GenerationConfig()) { piece -> ui { appendAnswer(piece) } }
                val ttft = result.ttftMs + (current?.decodeMs ?: 0.0)
                ui { stats.text = getString(R.string.stats_line, ttft, result.run.decodeTokS, result.run.generatedTokens) }
            } catch (e: Exception) {
                ui { stats.text = getString(R.string.error_prefix, e.message ?: e.toString()) }
            }
            ui { setBusy(false) }
        }
    }

    /** What one turn took: the app's preprocessing plus the runner's share. */
    private class TurnResult(
        val preprocessMs: Double,
        val run: RunStats,
    ) {
        /** From the upright pixels to the first piece (the caller adds the image decode). */
        val ttftMs: Double get() = preprocessMs + run.firstPieceMs
    }

    /** Worker thread: slicing + prompt layout by the core, then the runner. */
    private fun turn(
        pixels: ImagePixels?,
        text: String,
        config: GenerationConfig,
        onPiece: RunnerCallback,
    ): TurnResult {
        val b = bundle ?: throw IllegalStateException("no bundle loaded")
        val builder = prompts ?: throw IllegalStateException("no bundle loaded")
        val t0 = System.nanoTime()
        // The stock runner's vision method takes each slice's pixels: no host-side patches.
        val prepared = pixels?.let { Slicing.preprocessImage(it, b.manifest.sliceConfig, withPatches = false) }
        val layout = builder.build(text, listOfNotNull(prepared?.layout()))
        val preprocessMs = (System.nanoTime() - t0) / 1e6
        val run = runner.generate(layout.segments, listOfNotNull(prepared), config, onPiece)
        return TurnResult(preprocessMs, run)
    }

    private fun appendAnswer(piece: String) {
        answer.append(piece)
        answerScroll.post { answerScroll.fullScroll(View.FOCUS_DOWN) }
    }

    // ---- benchmark --------------------------------------------------------------------------

    /**
     * [BENCH_RUNS] timed turns on the current photo, each from its bytes (decode + EXIF included in
     * TTFT, as `bench` measures from image bytes in), at most [BENCH_DECODE_TOKENS] new tokens; then
     * `<files dir>/device-report.json` (copied to the external files dir for `adb pull`).
     */
    private fun benchmark() {
        val current = photo ?: return pickPhoto()
        val text = question.text.toString().ifBlank { BENCH_QUESTION }
        answer.text = ""
        setBusy(true, stoppable = true)
        worker.execute {
            try {
                val b = bundle ?: throw IllegalStateException("no bundle loaded")
                val cfg = b.manifest.sliceConfig
                val report =
                    DeviceReportBuilder(
                        b.manifest,
                        DeviceFacts(
                            device = "${Build.MANUFACTURER} ${Build.MODEL}",
                            osVersion = "${Build.VERSION.RELEASE} (API ${Build.VERSION.SDK_INT})",
                            appVersion = appVersion(),
                        ),
                        ReportSettings(
                            image = current.name,
                            width = current.pixels.width,
                            height = current.pixels.height,
                            downsampleMode = cfg.downsampleMode,
                            maxSliceNums = cfg.maxSliceNums,
                            decodeTokens = BENCH_DECODE_TOKENS,
                        ),
                    )
                for (i in 1..BENCH_RUNS) {
                    ui { status.text = getString(R.string.benchmark_running, i, BENCH_RUNS) }
                    val (pixels, decodeMs) = decodeUpright(current.bytes)
                    val result = turn(pixels, text, GenerationConfig(maxNewTokens = BENCH_DECODE_TOKENS)) { }
                    val run = result.run
                    report.addRun(
                        ReportRun(
                            ttftMs = decodeMs + result.ttftMs,
                            decodeTokS = run.decodeTokS,
                            decodeTokens = run.generatedTokens,
                            imageDecodeMs = decodeMs,
                            preprocessMs = result.preprocessMs,
                            visionMs = run.imagePrefillMs,
                            prefillMs = run.textPrefillMs,
                        ),
                    )
                    ui { stats.text = getString(R.string.stats_line, decodeMs + result.ttftMs, run.decodeTokS, run.generatedTokens) }
                }
                val json = report.toJson()
                val out = File(filesDir, REPORT_NAME)
                out.writeText(json, Charsets.UTF_8)
                getExternalFilesDir(null)?.let { File(it, REPORT_NAME).writeText(json, Charsets.UTF_8) }
                ui {
                    status.text = getString(R.string.benchmark_done, out.path)
                    answer.text = json
                }
            } catch (e: Exception) {
                ui { status.text = getString(R.string.error_prefix, e.message ?: e.toString()) }
            }
            ui { setBusy(false) }
        }
    }

    private fun appVersion(): String =
        try {
            packageManager.getPackageInfo(packageName, 0).versionName ?: ""
        } catch (e: Exception) {
            ""
        }

    // ---- helpers ----------------------------------------------------------------------------

    private fun setBusy(
        busy: Boolean,
        stoppable: Boolean = false,
    ) {
        for (b in actionButtons) b.isEnabled = !busy
        stopButton.isEnabled = busy && stoppable
    }

    private fun ui(block: () -> Unit) {
        main.post(block)
    }

    companion object {
        private const val REQUEST_PICK = 1
        private const val REQUEST_CAPTURE = 2
        private const val BENCH_RUNS = 5
        private const val BENCH_DECODE_TOKENS = 64
        private const val BENCH_QUESTION = "Describe this image in detail."
        private const val REPORT_NAME = "device-report.json"
        private const val PREVIEW_MAX_SIDE = 1024

        /**
         * Photo bytes -> upright RGB pixels and the milliseconds it took. BitmapFactory does not
         * apply EXIF orientation; the core reads it from the JPEG bytes and transposes like PIL's
         * exif_transpose. Transparent pixels are composited onto white.
         */
        fun decodeUpright(bytes: ByteArray): Pair<ImagePixels, Double> {
            val t0 = System.nanoTime()
            val options = BitmapFactory.Options().apply { inPreferredConfig = Bitmap.Config.ARGB_8888 }
            val bitmap =
                BitmapFactory.decodeByteArray(bytes, 0, bytes.size, options)
                    ?: throw IllegalArgumentException("not an image this phone can decode")
            val w = bitmap.width
            val h = bitmap.height
            val argb = IntArray(w * h)
            bitmap.getPixels(argb, 0, w, 0, 0, w, h)
            bitmap.recycle()
            if (bitmap.hasAlpha()) onWhite(argb)
            val upright = Exif.applyOrientation(ImagePixels.fromArgb(w, h, argb), Exif.jpegOrientation(bytes))
            return upright to (System.nanoTime() - t0) / 1e6
        }

        private fun onWhite(argb: IntArray) {
            for (i in argb.indices) {
                val p = argb[i]
                val a = p ushr 24
                if (a == 255) continue

                fun ch(shift: Int): Int = (((p shr shift) and 0xff) * a + 255 * (255 - a) + 127) / 255
                argb[i] = (0xff shl 24) or (ch(16) shl 16) or (ch(8) shl 8) or ch(0)
            }
        }

        /** A display copy of the upright pixels, at most [PREVIEW_MAX_SIDE] on its long side. */
        fun previewBitmap(pixels: ImagePixels): Bitmap {
            val step = maxOf(1, (maxOf(pixels.width, pixels.height) + PREVIEW_MAX_SIDE - 1) / PREVIEW_MAX_SIDE)
            val w = pixels.width / step
            val h = pixels.height / step
            val out = IntArray(maxOf(1, w) * maxOf(1, h))
            val rgb = pixels.rgb
            for (y in 0 until h) {
                for (x in 0 until w) {
                    val i = ((y * step) * pixels.width + x * step) * 3
                    val r = rgb[i].toInt() and 0xff
                    val g = rgb[i + 1].toInt() and 0xff
                    val b = rgb[i + 2].toInt() and 0xff
                    out[y * w + x] = (0xff shl 24) or (r shl 16) or (g shl 8) or b
                }
            }
            return Bitmap.createBitmap(out, maxOf(1, w), maxOf(1, h), Bitmap.Config.ARGB_8888)
        }
    }
}
